"""GPU tests: the fused kernel (devis_core/ops_build.py, ops/src) against the float64 PyTorch
reference for the output and all three gradients, at several shapes and every supported dtype.

Outputs and gradients are poisoned with NaN before every kernel run, so an element the kernel fails
to write fails the test. Bounds are on ||kernel - ref|| / ||ref||, ref computed in float64 from the
same (rounded) inputs: float32 1e-5 (accumulation order only; 1e-4 for location gradients, which
are differences of corner values), float16 3e-3 and bfloat16 1.5e-2 (one rounding of the result
to the output dtype dominates: 2^-11 and 2^-8 relative).
"""
import pytest
import torch

from devis_core import ops_build
from devis_core.attention import (
    default_temporal_frames,
    ms_deform_attn,
    ms_deform_attn_reference,
    windowed_temporal_frames,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BOUNDS = {  # (output and value/weight gradients, location gradients)
    torch.float32: (1e-5, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (1.5e-2, 1.5e-2),
}

BOUNDS_ORDER = list(BOUNDS)

CASES = {
    # odd level sizes, locations off the map, P_c != P_t
    "odd": dict(T=3, Q=37, M=4, D=32, shapes=[(13, 21), (7, 11), (4, 6), (2, 3)], Pc=4, Pt=2),
    # image batch (no temporal arguments), D = 16
    "image": dict(T=2, Q=50, M=8, D=16, shapes=[(10, 15), (5, 8)], Pc=3, Pt=0),
    # encoder window of 2 (mirrored slots, frames repeated in a row), D = 64
    "window": dict(T=5, Q=40, M=2, D=64, shapes=[(9, 12), (5, 6), (3, 3)], Pc=2, Pt=3, window=2),
    # DeVIS decoder cross-attention at a real level pyramid (360x640 input), N_q = 30
    "decoder": dict(T=6, Q=30, M=8, D=32, shapes=[(45, 80), (23, 40), (12, 20), (6, 10)], Pc=4, Pt=4),
    # a single frame with the temporal arguments present but empty (W = 0)
    "single": dict(T=1, Q=20, M=8, D=32, shapes=[(6, 7), (3, 4)], Pc=4, Pt=4),
}


def _inputs(T, Q, M, D, shapes, Pc, Pt, window=None, seed=0, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    shapes_t = torch.tensor(shapes, dtype=torch.long, device=dev)
    sizes = shapes_t.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(shapes)
    value = torch.randn(T, S, M, D, device=dev, generator=g)
    loc_c = -0.1 + 1.2 * torch.rand(T, Q, M, L, Pc, 2, device=dev, generator=g)
    logits_c = torch.randn(T, Q, M, L * Pc, device=dev, generator=g)
    if Pt == 0:
        a = logits_c.softmax(-1).view(T, Q, M, L, Pc)
        return [x.to(dtype) for x in (value, loc_c, a)], shapes_t, starts, None
    frames = windowed_temporal_frames(T, window, device=dev) if window else default_temporal_frames(T, device=dev)
    W = frames.shape[1]
    loc_t = -0.1 + 1.2 * torch.rand(T, Q, M, W, L, Pt, 2, device=dev, generator=g)
    logits_t = torch.randn(T, Q, M, W * L * Pt, device=dev, generator=g)
    a = torch.cat([logits_c, logits_t], -1).softmax(-1)     # joint normalisation, as the model does
    a_c = a[..., :L * Pc].reshape(T, Q, M, L, Pc)
    a_t = a[..., L * Pc:].reshape(T, Q, M, W, L, Pt)
    return [x.to(dtype) for x in (value, loc_c, a_c, loc_t, a_t)], shapes_t, starts, frames


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def ext():
    return ops_build.load_extension()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(ext, case, dtype):
    cfg = CASES[case]
    tensors, shapes, starts, frames = _inputs(**cfg, seed=17 * list(CASES).index(case) + BOUNDS_ORDER.index(dtype), dtype=dtype)
    bound, loc_bound = BOUNDS[dtype]
    errs = {}
    for trial in range(2):                                  # fresh random gradient each time
        kin = [x.detach().clone().requires_grad_(True) for x in tensors]
        rin = [x.detach().double().requires_grad_(True) for x in tensors]
        extra = [] if frames is None else [frames]
        with ops_build.poison_outputs(float("nan")):
            out = ms_deform_attn(kin[0], shapes, starts, *kin[1:], *extra, backend="cuda")
            grad = torch.randn(out.shape, device="cuda", dtype=torch.float32).to(dtype)
            kgrads = torch.autograd.grad(out, kin, grad, allow_unused=True)
        ref = ms_deform_attn_reference(rin[0], shapes, starts, *rin[1:], *extra)
        rgrads = torch.autograd.grad(ref, rin, grad.double(), allow_unused=True)
        assert out.dtype == dtype and out.shape == ref.shape
        for name, t in [("out", out)] + list(zip(["value", "loc_c", "attn_c", "loc_t", "attn_t"], kgrads)):
            assert t is None or torch.isfinite(t).all(), \
                f"{case}/{dtype}: {name} has unwritten (NaN) or non-finite elements"
        errs["out"] = max(errs.get("out", 0), _rel(out, ref))
        for name, kg, rg in zip(["value", "loc_c", "attn_c", "loc_t", "attn_t"], kgrads, rgrads):
            # with W = 0 the temporal inputs take part in neither computation
            assert (kg is None) == (rg is None), f"{case}/{dtype}: gradient of {name} present in one path only"
            if kg is not None:
                errs[name] = max(errs.get(name, 0), _rel(kg, rg))
    print(f"\nERRTABLE | {case} | {str(dtype).replace('torch.', '')} | "
          + " | ".join(f"{errs.get(k, float('nan')):.2e}" for k in ["out", "value", "loc_c", "attn_c", "loc_t", "attn_t"]))
    for name, e in errs.items():
        limit = loc_bound if name.startswith("loc") else bound
        assert e < limit, f"{case}/{dtype}: relative error of {name} = {e:.3e} >= {limit:.0e}"


def test_forward_is_deterministic_and_auto_picks_kernel(ext):
    tensors, shapes, starts, frames = _inputs(**CASES["odd"], seed=11)
    a = ms_deform_attn(tensors[0], shapes, starts, *tensors[1:], frames, backend="cuda")
    b = ms_deform_attn(tensors[0], shapes, starts, *tensors[1:], frames, backend="auto")
    assert torch.equal(a, b)


def test_mixed_dtypes_cast_to_value_dtype(ext):
    tensors, shapes, starts, frames = _inputs(**CASES["odd"], seed=12)
    value = tensors[0].half().requires_grad_(True)
    rest = [x.clone().requires_grad_(True) for x in tensors[1:]]   # float32 locations / weights
    out = ms_deform_attn(value, shapes, starts, *rest, frames, backend="cuda")
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert value.grad.dtype == torch.float16
    assert all(x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() for x in rest)


def test_cuda_backend_rejects_unsupported_head_dim(ext):
    tensors, shapes, starts, frames = _inputs(T=2, Q=4, M=2, D=8, shapes=[(3, 3)], Pc=1, Pt=1, seed=13)
    with pytest.raises(RuntimeError, match="head dim D=8"):
        ms_deform_attn(tensors[0], shapes, starts, *tensors[1:], frames, backend="cuda")
    with pytest.warns(RuntimeWarning, match="head dim D=8"):
        out = ms_deform_attn(tensors[0], shapes, starts, *tensors[1:], frames, backend="auto")
    torch.testing.assert_close(out, ms_deform_attn_reference(tensors[0], shapes, starts, *tensors[1:], frames))


def _value_grad_error(tensors, shapes, starts, frames, dtype):
    """Relative error of the kernel's value gradient against the float64 reference."""
    kin = [x.detach().clone().requires_grad_(i == 0) for i, x in enumerate(tensors)]
    out = ms_deform_attn(kin[0], shapes, starts, *kin[1:], frames, backend="cuda")
    grad = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(5)).to(dtype)
    (kg,) = torch.autograd.grad(out, [kin[0]], grad)
    rin = [x.detach().double().requires_grad_(i == 0) for i, x in enumerate(tensors)]
    ref = ms_deform_attn_reference(rin[0], shapes, starts, *rin[1:], frames)
    (rg,) = torch.autograd.grad(ref, [rin[0]], grad.double())
    return _rel(kg, rg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_value_gradient_when_samples_crowd_into_few_cells(ext, dtype):
    # The backward sorts samples by the cell they read and sums each cell in chunks of sorted
    # entries. Here every sample of a (frame, level) reads the same point, so one cell holds
    # thousands of entries spread over many chunks, and a few samples sit at the map's edges
    # (cells with corners off the map).
    T, Q, M, D, shapes_l, Pc, Pt = 3, 300, 2, 32, [(9, 14), (5, 7)], 4, 4
    tensors, shapes, starts, frames = _inputs(T=T, Q=Q, M=M, D=D, shapes=shapes_l, Pc=Pc, Pt=Pt, seed=31)
    value, loc_c, a_c, loc_t, a_t = [x.float() for x in tensors]
    loc_c = torch.full_like(loc_c, 0.37)
    loc_t = torch.full_like(loc_t, 0.61)
    loc_c[:, :5, :, :, 0] = torch.tensor([0.0, 1.0], device="cuda")     # corners half off the map
    loc_t[:, 5:9, :, :, :, 1] = torch.tensor([1.02, -0.03], device="cuda")
    err = _value_grad_error([x.to(dtype) for x in (value, loc_c, a_c, loc_t, a_t)], shapes, starts, frames, dtype)
    assert err < BOUNDS[dtype][0], f"value gradient relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_value_gradient_at_encoder_geometry(ext, dtype):
    # DeVIS encoder geometry (benchmark inputs: every token samples around its own position in
    # every frame), where the cells of neighbouring queries overlap.
    from devis_core.benchmarks.attention import Case, make_inputs
    case = Case("small encoder", "encoder", 96, 160, frames=4, heads=4, head_dim=32)
    inp = make_inputs(case, dtype, "cuda", seed=3)
    tensors = [inp[k] for k in ("value", "loc_current", "attn_current", "loc_temporal", "attn_temporal")]
    err = _value_grad_error(tensors, inp["spatial_shapes"], inp["level_start_index"], inp["temporal_frames"], dtype)
    assert err < BOUNDS[dtype][0], f"value gradient relative error {err:.2e}"


def test_second_backward_reuses_the_forward_counts(ext):
    # The forward counts the samples per value-gradient cell and the backward sorts by those
    # counts without changing them, so a retained graph gives the same gradients twice.
    tensors, shapes, starts, frames = _inputs(**CASES["odd"], seed=41)
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    out = ms_deform_attn(leaves[0], shapes, starts, *leaves[1:], frames, backend="cuda")
    grad = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad)
    for name, a, b in zip(("value", "loc_c", "attn_c", "loc_t", "attn_t"), first, second):
        # the value gradient's atomic additions may sum in another order
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_binding_rejects_a_count_buffer_of_the_wrong_size(ext):
    # The error message carries integers, which go through the kernel's text helper (streaming an
    # integer into a c10 message from the nvcc-compiled file crashed the process on the H100 machines).
    tensors, shapes, starts, frames = _inputs(**CASES["odd"], seed=42)
    value, loc_c, a_c, loc_t, a_t = (x.contiguous() for x in tensors)
    T, S, M, D = value.shape
    out, counts = ext.forward(value, shapes, starts, loc_c, a_c, loc_t, a_t, frames, True)
    cells = ext.num_cells(T, S, M, loc_c.shape[3])
    assert cells == T * M * (2 * S + 2 * loc_c.shape[3]) and counts.shape == (cells,)
    assert counts.dtype == torch.int32 and int(counts.sum()) > 0
    grad = torch.ones_like(out)
    with pytest.raises(RuntimeError, match=rf"counts must be int32 of shape \({cells},\).* with 1 dims and "
                                           rf"{cells - 1} elements"):
        ext.backward(value, shapes, starts, loc_c, a_c, loc_t, a_t, frames, grad, counts[:-1].clone())
    with pytest.raises(RuntimeError, match="counts must be int32 .*got Long"):
        ext.backward(value, shapes, starts, loc_c, a_c, loc_t, a_t, frames, grad, counts.long())
    _, no_counts = ext.forward(value, shapes, starts, loc_c, a_c, loc_t, a_t, frames, False)
    assert no_counts.numel() == 0
