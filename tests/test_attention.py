"""CPU tests of devis_core/attention.py: frame slots, the PyTorch definition against a naive
per-sample loop and against the official two-calls-per-frame pattern, gradients, input errors."""
import math

import numpy as np
import pytest
import torch

from devis_core.attention import (
    default_temporal_frames,
    ms_deform_attn,
    ms_deform_attn_reference,
    windowed_temporal_frames,
)


# ---------------------------------------------------------------------------------------------
# helpers


def _levels(shapes):
    shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes, starts, int(sizes.sum())


def _inputs(T, Q, M, D, shapes, Pc, Pt=0, W=None, lo=-0.3, hi=1.3, seed=0, dtype=torch.float64):
    """Random op inputs; locations in [lo, hi] so some samples fall partly or wholly off the map."""
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = _levels(shapes)
    L = shapes.shape[0]
    W = T - 1 if W is None else W
    value = torch.randn(T, S, M, D, generator=g, dtype=dtype)
    loc_c = lo + (hi - lo) * torch.rand(T, Q, M, L, Pc, 2, generator=g, dtype=dtype)
    attn_c = torch.rand(T, Q, M, L, Pc, generator=g, dtype=dtype)
    if Pt == 0:
        return value, shapes, starts, loc_c, attn_c, None, None
    loc_t = lo + (hi - lo) * torch.rand(T, Q, M, W, L, Pt, 2, generator=g, dtype=dtype)
    attn_t = torch.rand(T, Q, M, W, L, Pt, generator=g, dtype=dtype)
    # the caller normalises jointly; mimic it so the numbers have realistic size
    total = attn_c.sum((3, 4)) + attn_t.sum((3, 4, 5))
    return (value, shapes, starts, loc_c, attn_c / total[..., None, None],
            loc_t, attn_t / total[..., None, None, None])


def _bilinear(vmap, x, y):
    """Naive zero-padded bilinear read of vmap (H, W, D) at pixel coords (x, y), corner by corner."""
    H, W, _ = vmap.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(vmap.shape[2])
    for xi in (x0, x0 + 1):
        for yi in (y0, y0 + 1):
            if 0 <= xi < W and 0 <= yi < H:
                out += (1 - abs(x - xi)) * (1 - abs(y - yi)) * vmap[yi, xi]
    return out


def _naive(value, shapes, starts, loc_c, attn_c, loc_t=None, attn_t=None, frames=None):
    """One sample at a time, straight from spec §2 / §3.3; returns (T, Q, M*D) float64 numpy."""
    v = value.double().numpy()
    T, S, M, D = v.shape
    Q, L, Pc = loc_c.shape[1], loc_c.shape[3], loc_c.shape[4]
    lc, ac = loc_c.double().numpy(), attn_c.double().numpy()
    out = np.zeros((T, Q, M, D))

    def read(frame, lvl, m, loc):
        h, w = (int(s) for s in shapes[lvl])
        s0 = int(starts[lvl])
        vmap = v[frame, s0:s0 + h * w, m].reshape(h, w, D)
        return _bilinear(vmap, loc[0] * w - 0.5, loc[1] * h - 0.5)

    for t in range(T):
        for q in range(Q):
            for m in range(M):
                for lvl in range(L):
                    for p in range(Pc):
                        out[t, q, m] += ac[t, q, m, lvl, p] * read(t, lvl, m, lc[t, q, m, lvl, p])
    if loc_t is not None:
        lt, at = loc_t.double().numpy(), attn_t.double().numpy()
        W, Pt = lt.shape[3], lt.shape[5]
        for t in range(T):
            for q in range(Q):
                for m in range(M):
                    for w in range(W):
                        f = int(frames[t, w])
                        for lvl in range(L):
                            for p in range(Pt):
                                out[t, q, m] += at[t, q, m, w, lvl, p] * read(f, lvl, m, lt[t, q, m, w, lvl, p])
    return out.reshape(T, Q, M * D)


def _official_pattern(value, shapes, starts, loc_c, attn_c, loc_t, attn_t, frames):
    """Spec §3.3's op-call table: per frame, one call on the frame, one on the W other frames
    concatenated as W*L pseudo-levels; each call made through the image (no temporal) path."""
    T, S, M, D = value.shape
    W, L, Pt = loc_t.shape[3], loc_t.shape[4], loc_t.shape[5]
    Q = loc_c.shape[1]
    shapes_rep = shapes.repeat(W, 1)
    sizes = shapes_rep.prod(1)
    starts_rep = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    outs = []
    for t in range(T):
        cur = ms_deform_attn_reference(value[t:t + 1], shapes, starts, loc_c[t:t + 1], attn_c[t:t + 1])
        tv = value[frames[t]].reshape(1, W * S, M, D)
        tmp = ms_deform_attn_reference(tv, shapes_rep, starts_rep,
                                       loc_t[t:t + 1].reshape(1, Q, M, W * L, Pt, 2),
                                       attn_t[t:t + 1].reshape(1, Q, M, W * L, Pt))
        outs.append(cur + tmp)
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# frame slots


def test_default_temporal_frames_hand_written():
    expected = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    assert torch.equal(default_temporal_frames(4), expected)
    assert default_temporal_frames(1).shape == (1, 0)
    with pytest.raises(ValueError, match="num_frames"):
        default_temporal_frames(0)


def test_windowed_temporal_frames_mirror_rule():
    # window 2: offsets [-1, 1]; frame 0's -1 and frame 5's +1 are mirrored
    assert windowed_temporal_frames(6, 2).tolist() == [[1, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 4]]
    # window 3: offsets [-2, -1, 1] (floor(-3/2) = -2); frame 1: -2 -> +2 = 3
    assert windowed_temporal_frames(6, 3).tolist() == [
        [2, 1, 1], [3, 0, 2], [0, 1, 3], [1, 2, 4], [2, 3, 5], [3, 4, 4]]
    # window 5: offsets [-3, -2, -1, 1, 2]
    assert windowed_temporal_frames(6, 5)[0].tolist() == [3, 2, 1, 1, 2]
    assert windowed_temporal_frames(6, 5)[5].tolist() == [2, 3, 4, 4, 3]


def test_windowed_temporal_frames_too_wide():
    with pytest.raises(ValueError, match="too wide.*frame 0, offset -2"):
        windowed_temporal_frames(2, 4)


# ---------------------------------------------------------------------------------------------
# the definition against the naive loop


@pytest.mark.parametrize("case", [
    dict(T=3, Q=4, M=2, D=3, shapes=[(3, 5), (2, 3)], Pc=2, Pt=1),
    dict(T=2, Q=3, M=3, D=2, shapes=[(5, 3), (1, 1), (2, 7)], Pc=1, Pt=3),
    dict(T=4, Q=2, M=1, D=4, shapes=[(4, 4)], Pc=3, Pt=2),
])
def test_reference_matches_naive_loop_default_slots(case):
    value, shapes, starts, lc, ac, lt, at = _inputs(**case, seed=1)
    frames = default_temporal_frames(case["T"])
    got = ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at)
    want = _naive(value, shapes, starts, lc, ac, lt, at, frames)
    assert got.shape == (case["T"], case["Q"], case["M"] * case["D"])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_reference_matches_naive_loop_windowed_slots():
    # window 3 in a 4-frame clip repeats frames within a row and reads some frames more often than
    # others: the regrouping by source frame must handle uneven groups
    T = 4
    frames = windowed_temporal_frames(T, 3)
    value, shapes, starts, lc, ac, lt, at = _inputs(T=T, Q=3, M=2, D=2, shapes=[(3, 4), (2, 2)],
                                                    Pc=1, Pt=2, W=3, seed=2)
    got = ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, frames)
    want = _naive(value, shapes, starts, lc, ac, lt, at, frames)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_reference_image_batch_matches_naive_loop():
    value, shapes, starts, lc, ac, _, _ = _inputs(T=3, Q=5, M=2, D=3, shapes=[(3, 5), (2, 3), (1, 2)],
                                                  Pc=2, seed=3)
    got = ms_deform_attn_reference(value, shapes, starts, lc, ac)
    np.testing.assert_allclose(got.numpy(), _naive(value, shapes, starts, lc, ac), rtol=1e-12, atol=1e-12)


def test_reference_hand_computed_single_sample():
    # one 2x3 map (H=2, W=3), value = 10*y + x; loc (0.5, 0.5) -> pixel (1.0, 0.5): between rows 0
    # and 1 of column 1 -> (1 + 11) / 2 = 6; a second point at the top-left corner (0, 0) -> pixel
    # (-0.5, -0.5): only corner (0, 0) is inside, with weight 0.25 -> 0
    shapes, starts, S = _levels([(2, 3)])
    value = torch.tensor([0., 1., 2., 10., 11., 12.], dtype=torch.float64).view(1, S, 1, 1)
    loc = torch.tensor([[0.5, 0.5], [1.0 / 3.0, 0.75]], dtype=torch.float64).view(1, 1, 1, 1, 2, 2)
    attn = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 1, 2)
    # second point: pixel (0.5, 1.0) -> between columns 0 and 1 of row 1 -> 10.5, weighted by 2
    out = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    assert out.shape == (1, 1, 1)
    assert out.item() == pytest.approx(6.0 + 2 * 10.5, abs=1e-12)
    loc_edge = torch.tensor([[0.0, 0.0]], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    value2 = value + 1.0                                   # corner (0, 0) holds 1
    out = ms_deform_attn_reference(value2, shapes, starts, loc_edge, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    assert out.item() == pytest.approx(0.25, abs=1e-12)


def test_reference_equals_official_two_call_pattern():
    T = 4
    frames = default_temporal_frames(T)
    value, shapes, starts, lc, ac, lt, at = _inputs(T=T, Q=6, M=2, D=4, shapes=[(6, 10), (3, 5), (2, 3)],
                                                    Pc=3, Pt=2, lo=0.0, hi=1.0, seed=4)
    got = ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at)
    want = _official_pattern(value, shapes, starts, lc, ac, lt, at, frames)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_single_frame_clip_equals_image_call():
    value, shapes, starts, lc, ac, lt, at = _inputs(T=1, Q=3, M=2, D=2, shapes=[(3, 3)], Pc=2, Pt=2, seed=5)
    assert lt.shape[3] == 0
    a = ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at)
    b = ms_deform_attn_reference(value, shapes, starts, lc, ac)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float32_close_to_float64():
    args64 = _inputs(T=3, Q=5, M=2, D=4, shapes=[(6, 7), (3, 4)], Pc=2, Pt=2, seed=6)
    args32 = [a.float() if a is not None and a.is_floating_point() else a for a in args64]
    out64 = ms_deform_attn_reference(*args64)
    out32 = ms_deform_attn_reference(*args32)
    assert out32.dtype == torch.float32
    rel = (out32.double() - out64).norm() / out64.norm()
    assert rel < 1e-6


def test_dispatch_on_cpu_uses_reference():
    args = _inputs(T=2, Q=3, M=2, D=2, shapes=[(3, 3)], Pc=1, Pt=1, seed=7)
    ref = ms_deform_attn_reference(*args)
    torch.testing.assert_close(ms_deform_attn(*args), ref, rtol=0, atol=0)
    torch.testing.assert_close(ms_deform_attn(*args, backend="reference"), ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backend='cuda'.*CUDA"):
        ms_deform_attn(*args, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(*args, backend="triton")


# ---------------------------------------------------------------------------------------------
# gradients


def _off_grid(loc, sizes_xy, margin=0.15):
    """Move locations so that no pixel coordinate sits within `margin` of an integer (where the
    bilinear kernel has a kink and finite differences are meaningless)."""
    pix = loc * sizes_xy - 0.5
    frac = pix - pix.floor()
    frac = margin + (1 - 2 * margin) * frac
    return (pix.floor() + frac + 0.5) / sizes_xy


def test_gradcheck_float64():
    T, L = 3, 2
    value, shapes, starts, lc, ac, lt, at = _inputs(T=T, Q=2, M=2, D=2, shapes=[(3, 4), (2, 3)],
                                                    Pc=2, Pt=1, lo=-0.2, hi=1.2, seed=8)
    wh = shapes.flip(1).double()                             # (L, 2) as (W_l, H_l)
    lc = _off_grid(lc, wh[None, None, None, :, None, :])
    lt = _off_grid(lt, wh[None, None, None, None, :, None, :])
    frames = windowed_temporal_frames(T, 2)
    tensors = [x.clone().requires_grad_(True) for x in (value, lc, ac, lt, at)]

    def fn(v, a, b, c, d):
        return ms_deform_attn_reference(v, shapes, starts, a, b, c, d, frames)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_value_gradient_is_sampling_weight():
    # d out / d value at one pixel equals the total bilinear weight that lands on it: a hand-checked
    # sample at pixel (0.25, 0.5) of a 2x2 map spreads 0.75*0.5, 0.25*0.5, 0.75*0.5, 0.25*0.5
    shapes, starts, S = _levels([(2, 2)])
    value = torch.zeros(1, S, 1, 1, dtype=torch.float64, requires_grad=True)
    loc = torch.tensor([(0.25 + 0.5) / 2, (0.5 + 0.5) / 2], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_reference(value, shapes, starts, loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    out.sum().backward()
    assert value.grad.flatten().tolist() == pytest.approx([0.375, 0.125, 0.375, 0.125], abs=1e-12)


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    value, shapes, starts, lc, ac, lt, at = _inputs(T=3, Q=2, M=2, D=2, shapes=[(3, 4)], Pc=1, Pt=1, seed=9)
    with pytest.raises(ValueError, match="value: expected a 4-D"):
        ms_deform_attn_reference(value[0], shapes, starts, lc, ac)
    with pytest.raises(ValueError, match="spatial_shapes: expected sum of H_l\\*W_l equal to value.shape\\[1\\] = 12"):
        ms_deform_attn_reference(value, torch.tensor([[3, 5]]), starts, lc, ac)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn_reference(value, shapes, starts + 1, lc, ac)
    with pytest.raises(ValueError, match="loc_current: expected \\(T=3, Q, M=2, L=1, P_c, 2\\)"):
        ms_deform_attn_reference(value, shapes, starts, lc[:, :, :1], ac)
    with pytest.raises(ValueError, match="attn_current"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac[..., :0])
    with pytest.raises(ValueError, match="given together"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, None)
    with pytest.raises(ValueError, match="W=1 slots; without temporal_frames the default slots need W = T-1 = 2"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, lt[:, :, :, :1], at[:, :, :, :1])
    with pytest.raises(ValueError, match="temporal_frames: entries must lie in \\[0, 2\\]"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, torch.full((3, 2), 3))
    with pytest.raises(ValueError, match="temporal_frames: expected shape \\(3, 2\\)"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temporal_frames given without"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, None, None, default_temporal_frames(3))


def test_remembered_checks_see_in_place_edits_and_new_tensors():
    # the integer-input checks are cached per tensor object; an in-place edit or a new tensor with
    # bad contents must still be caught
    value, shapes, starts, lc, ac, lt, at = _inputs(T=3, Q=2, M=2, D=2, shapes=[(3, 4)], Pc=1, Pt=1, seed=11)
    frames = default_temporal_frames(3)
    ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, frames)      # passes, remembered
    ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, frames)      # cache hit
    frames[1, 0] = 5
    with pytest.raises(ValueError, match="temporal_frames: entries must lie in \\[0, 2\\], got range \\[0, 5\\]"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, frames)
    frames[1, 0] = 0
    ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, frames)
    starts += 1
    with pytest.raises(ValueError, match="level_start_index: expected the cumulative level sizes \\[0\\], got \\[1\\]"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, frames)
    starts -= 1
    shapes[0, 0] = 0
    with pytest.raises(ValueError, match="spatial_shapes: expected positive"):
        ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at, frames)
    with pytest.raises(ValueError, match="spatial_shapes: expected sum of H_l\\*W_l equal to value.shape\\[1\\] = 12, got 10"):
        ms_deform_attn_reference(value, torch.tensor([[2, 5]]), starts, lc, ac, lt, at, frames)

def test_parity_sized_clip_is_fast_enough_on_cpu():
    # the DeVIS parity fixture: T=4, 96x160 input -> levels 12x20, 6x10, 3x5, 2x3 (S=321), 8 heads
    value, shapes, starts, lc, ac, lt, at = _inputs(T=4, Q=321, M=8, D=32, shapes=[(12, 20), (6, 10), (3, 5), (2, 3)],
                                                    Pc=4, Pt=4, lo=0.0, hi=1.0, seed=10)
    out = ms_deform_attn_reference(value, shapes, starts, lc, ac, lt, at)
    # spot-check one (frame, query, head) against the naive loop restricted to that query
    sel = (slice(None), slice(17, 18))
    want = _naive(value, shapes, starts, lc[sel], ac[sel], lt[sel], at[sel], default_temporal_frames(4))
    np.testing.assert_allclose(out[:, 17:18].numpy(), want, rtol=1e-10, atol=1e-12)
