"""Temporal multi-scale deformable attention: the op (spec §2-§3), its PyTorch definition and frame slots.

The op takes *final* sampling locations; building them from reference points and offsets is the
attention module's job. One call covers a whole clip: every frame's queries sample their own frame
(``P_c`` points per level) and, optionally, ``W`` other frames (``P_t`` points per level per slot),
slot ``w`` of frame ``t`` reading frame ``temporal_frames[t, w]`` by index. Without temporal
arguments the leading axis is simply a batch of independent images.

``ms_deform_attn_reference`` is the definition (any device, float32/float64, autograd); the fused
CUDA kernel in ``ops/`` is tested against it.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "default_temporal_frames",
    "windowed_temporal_frames",
    "check_temporal_frames",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]

BACKENDS = ("auto", "reference", "cuda")

# Normalised coordinate far outside every map: a padded (unused) sample placed there reads only
# zero padding, so it adds exactly nothing (and gets zero gradient) in grid_sample.
_OUTSIDE = -4.0


# ---------------------------------------------------------------------------------------------
# frame slots


def default_temporal_frames(num_frames: int, device=None) -> torch.Tensor:
    """Other-frame slots of every frame, all frames connected (spec §3.3).

    Returns (T, T-1) int64: row t lists the frames f != t in ascending order, so slot w of frame t
    is ``w`` if ``w < t`` else ``w + 1``. T=1 gives a (1, 0) tensor (no temporal sampling).
    """
    if int(num_frames) < 1:
        raise ValueError(f"default_temporal_frames: num_frames must be >= 1, got {num_frames}")
    T = int(num_frames)
    w = torch.arange(T - 1, device=device).expand(T, T - 1)
    t = torch.arange(T, device=device)[:, None]
    return w + (w >= t).long()


def windowed_temporal_frames(num_frames: int, window: int, device=None) -> torch.Tensor:
    """Encoder slots with a temporal window (``ENC_CONNECT_ALL_FRAMES=False``, spec §3.4).

    Offsets are ``[o for o in range(floor(-window/2), window // 2 + 1) if o != 0]`` (``window``
    of them, kept in that order); an offset that leaves the clip is replaced by its negation.
    Returns (T, window) int64 frame indices. Raises ValueError when even the mirrored offset
    leaves the clip (the official code would index out of range there).
    """
    T, window = int(num_frames), int(window)
    if T < 1 or window < 1:
        raise ValueError(f"windowed_temporal_frames: need num_frames >= 1 and window >= 1, "
                         f"got num_frames={num_frames}, window={window}")
    # floor division of the negated window is the official rule; it keeps len(offsets) == window
    offsets = [o for o in range(-window // 2, window // 2 + 1) if o != 0]
    rows = []
    for t in range(T):
        row = []
        for o in offsets:
            f = t + o if 0 <= t + o < T else t - o
            if not 0 <= f < T:
                raise ValueError(f"windowed_temporal_frames: window {window} is too wide for a clip of "
                                 f"{T} frames (frame {t}, offset {o}: neither {t + o} nor {t - o} is in "
                                 f"[0, {T - 1}])")
            row.append(f)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long, device=device)


def check_temporal_frames(temporal_frames: torch.Tensor, num_frames: int, num_slots: int) -> None:
    """Raise ValueError unless ``temporal_frames`` is (T, W) integer with entries in [0, T)."""
    if not isinstance(temporal_frames, torch.Tensor) or temporal_frames.dtype not in (
            torch.int64, torch.int32):
        raise ValueError(f"temporal_frames: expected an int64 tensor of shape ({num_frames}, {num_slots}), "
                         f"got {type(temporal_frames).__name__} "
                         f"{getattr(temporal_frames, 'dtype', '')}")
    if tuple(temporal_frames.shape) != (num_frames, num_slots):
        raise ValueError(f"temporal_frames: expected shape ({num_frames}, {num_slots}) = (T, W), "
                         f"got {tuple(temporal_frames.shape)}")
    if temporal_frames.numel() and (int(temporal_frames.min()) < 0
                                    or int(temporal_frames.max()) >= num_frames):
        raise ValueError(f"temporal_frames: entries must lie in [0, {num_frames - 1}], got range "
                         f"[{int(temporal_frames.min())}, {int(temporal_frames.max())}]")


# ---------------------------------------------------------------------------------------------
# input checks


def _check_inputs(value, spatial_shapes, level_start_index, loc_current, attn_current,
                  loc_temporal, attn_temporal, temporal_frames):
    """Validate shapes/dtypes; returns (T, S, M, D, L, Q, P_c, W, P_t, temporal_frames or None)."""
    def fail(name, expected, got):
        raise ValueError(f"ms_deform_attn: {name}: expected {expected}, got {got}")

    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        fail("value", "a 4-D tensor (T, S, M, D)", getattr(value, "shape", type(value).__name__))
    if not value.is_floating_point():
        fail("value", "a floating-point tensor", value.dtype)
    T, S, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point():
        fail("spatial_shapes", "an integer tensor (L, 2) of (H_l, W_l)",
             f"{spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (L,) or level_start_index.is_floating_point():
        fail("level_start_index", f"an integer tensor ({L},)",
             f"{level_start_index.dtype} {tuple(level_start_index.shape)}")
    if L < 1:
        fail("spatial_shapes", "at least one level", "none")
    if loc_current.dim() != 6 or loc_current.shape[0] != T or loc_current.shape[2] != M \
            or loc_current.shape[3] != L or loc_current.shape[5] != 2:
        fail("loc_current", f"(T={T}, Q, M={M}, L={L}, P_c, 2)", tuple(loc_current.shape))
    Q, Pc = loc_current.shape[1], loc_current.shape[4]
    if tuple(attn_current.shape) != tuple(loc_current.shape[:5]):
        fail("attn_current", f"(T, Q, M, L, P_c) = {tuple(loc_current.shape[:5])}", tuple(attn_current.shape))
    for name, t in (("loc_current", loc_current), ("attn_current", attn_current)):
        if not t.is_floating_point() or t.device != value.device:
            fail(name, f"a floating-point tensor on {value.device}", f"{t.dtype} on {t.device}")
    if (loc_temporal is None) != (attn_temporal is None):
        raise ValueError("ms_deform_attn: loc_temporal and attn_temporal must be given together")
    if loc_temporal is None:
        if temporal_frames is not None:
            raise ValueError("ms_deform_attn: temporal_frames given without loc_temporal/attn_temporal")
        _check_contents(value, spatial_shapes, level_start_index, None, 0)
        return T, S, M, D, L, Q, Pc, 0, 0, None
    if loc_temporal.dim() != 7 or tuple(loc_temporal.shape[:3]) != (T, Q, M) \
            or loc_temporal.shape[4] != L or loc_temporal.shape[6] != 2:
        fail("loc_temporal", f"(T={T}, Q={Q}, M={M}, W, L={L}, P_t, 2)", tuple(loc_temporal.shape))
    W, Pt = loc_temporal.shape[3], loc_temporal.shape[5]
    if tuple(attn_temporal.shape) != tuple(loc_temporal.shape[:6]):
        fail("attn_temporal", f"(T, Q, M, W, L, P_t) = {tuple(loc_temporal.shape[:6])}",
             tuple(attn_temporal.shape))
    for name, t in (("loc_temporal", loc_temporal), ("attn_temporal", attn_temporal)):
        if not t.is_floating_point() or t.device != value.device:
            fail(name, f"a floating-point tensor on {value.device}", f"{t.dtype} on {t.device}")
    if temporal_frames is None:
        if W != T - 1:
            raise ValueError(f"ms_deform_attn: loc_temporal has W={W} slots; without temporal_frames "
                             f"the default slots need W = T-1 = {T - 1}")
        temporal_frames = _default_frames(T, value.device)
    if not isinstance(temporal_frames, torch.Tensor) or tuple(temporal_frames.shape) != (T, W) \
            or temporal_frames.dtype not in (torch.int64, torch.int32):
        check_temporal_frames(temporal_frames, T, W)          # raises with the details
    _check_contents(value, spatial_shapes, level_start_index, temporal_frames, W)
    if temporal_frames.dtype != torch.long or temporal_frames.device != value.device:
        temporal_frames = temporal_frames.to(device=value.device, dtype=torch.long)
    return T, S, M, D, L, Q, Pc, W, Pt, temporal_frames


_HOST_CACHE: dict = {}          # id(tensor) -> (weakref, version, host copy)
_DEFAULT_FRAMES: dict = {}      # (T, device) -> default_temporal_frames(T)


def _host_ints(t: torch.Tensor) -> torch.Tensor:
    """CPU int64 copy of a small integer tensor, remembered while the same tensor object lives
    unmodified (a weakref and the version counter guard against reuse of ids and in-place edits),
    so the layers of a model that share one spatial_shapes tensor pay the device transfer once."""
    hit = _HOST_CACHE.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    host = t.detach().to("cpu", torch.long)
    if len(_HOST_CACHE) > 64:
        _HOST_CACHE.clear()
    _HOST_CACHE[id(t)] = (weakref.ref(t), t._version, host)
    return host


def _default_frames(T: int, device) -> torch.Tensor:
    """Shared default slot table per (T, device); internal callers never modify it."""
    key = (T, str(device))
    if key not in _DEFAULT_FRAMES:
        _DEFAULT_FRAMES[key] = default_temporal_frames(T, device=device)
    return _DEFAULT_FRAMES[key]


_CHECKED: dict = {}             # (T, S, (id, version) per integer input) -> weakrefs of those inputs


def _check_contents(value, spatial_shapes, level_start_index, temporal_frames, W):
    """Check the values of the integer inputs (on host copies, see _host_ints).

    A passing combination is remembered while the same tensor objects live unmodified (weakrefs
    and version counters, as in _host_ints): the per-call checks cost tens of microseconds of host
    time, which the GPU spends idle in front of a sub-millisecond kernel.
    """
    T, S = value.shape[0], value.shape[1]
    ints = (spatial_shapes, level_start_index) + (() if temporal_frames is None else (temporal_frames,))
    key = (T, S) + tuple((id(t), t._version) for t in ints)
    refs = _CHECKED.get(key)
    if refs is not None and all(r() is t for r, t in zip(refs, ints)):
        return
    _check_contents_uncached(T, S, spatial_shapes, level_start_index, temporal_frames)
    if len(_CHECKED) > 64:
        _CHECKED.clear()
    _CHECKED[key] = tuple(weakref.ref(t) for t in ints)


def _check_contents_uncached(T, S, spatial_shapes, level_start_index, temporal_frames):
    host = _host_ints(spatial_shapes)
    if bool((host <= 0).any()):
        raise ValueError(f"ms_deform_attn: spatial_shapes: expected positive (H_l, W_l), got {host.tolist()}")
    sizes = host.prod(1)
    if int(sizes.sum()) != S:
        raise ValueError(f"ms_deform_attn: spatial_shapes: expected sum of H_l*W_l equal to "
                         f"value.shape[1] = {S}, got {int(sizes.sum())}")
    expect = (sizes.cumsum(0) - sizes).tolist()
    got = _host_ints(level_start_index).tolist()
    if got != expect:
        raise ValueError(f"ms_deform_attn: level_start_index: expected the cumulative level sizes "
                         f"{expect}, got {got}")
    if temporal_frames is not None and temporal_frames.numel():
        frames = _host_ints(temporal_frames)
        if int(frames.min()) < 0 or int(frames.max()) >= T:
            raise ValueError(f"temporal_frames: entries must lie in [0, {T - 1}], got range "
                             f"[{int(frames.min())}, {int(frames.max())}]")


# ---------------------------------------------------------------------------------------------
# PyTorch definition


def _level_maps(value, shapes, starts):
    """Split value (T, S, M, D) into per-level maps (T*M, D, H_l, W_l), the layout grid_sample reads."""
    T, S, M, D = value.shape
    maps = []
    for (h, w), s in zip(shapes, starts):
        v = value[:, s:s + h * w]                                   # (T, HW, M, D)
        maps.append(v.permute(0, 2, 3, 1).reshape(T * M, D, h, w))
    return maps


def _grid(loc):
    """(N, Q', P, 2) normalised [0, 1] -> grid_sample's [-1, 1] (align_corners=False)."""
    return 2.0 * loc - 1.0


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, loc_current, attn_current,
                             loc_temporal=None, attn_temporal=None, temporal_frames=None):
    """The op's definition in PyTorch (vectorised ``grid_sample``, autograd, any device).

    value (T, S, M, D); spatial_shapes (L, 2) int64 (H_l, W_l); level_start_index (L,) int64;
    loc_current (T, Q, M, L, P_c, 2) normalised (x, y), (0, 0) top-left corner, (1, 1) bottom-right;
    attn_current (T, Q, M, L, P_c); loc_temporal (T, Q, M, W, L, P_t, 2), slot w of frame t samples
    frame ``temporal_frames[t, w]``; attn_temporal (T, Q, M, W, L, P_t); temporal_frames (T, W) int64
    (default ``default_temporal_frames(T)``). Bilinear, align_corners=False, zero padding (spec §2).
    Returns (T, Q, M*D) in value's dtype, heads concatenated in head order.

    Temporal samples are grouped by the frame they read: the (t, w) pairs reading frame f are
    stacked along the query axis of one grid, so every level needs a single grid_sample over all
    frames and no copy of other frames' values is built.
    """
    T, S, M, D, L, Q, Pc, W, Pt, frames = _check_inputs(
        value, spatial_shapes, level_start_index, loc_current, attn_current,
        loc_temporal, attn_temporal, temporal_frames)
    dt = value.dtype
    shapes = [tuple(hw) for hw in _host_ints(spatial_shapes).tolist()]
    starts = _host_ints(level_start_index).tolist()
    maps = _level_maps(value, shapes, starts)

    # current frame: batch (t, m) of the maps lines up with (t, m) of the queries
    grid_c = _grid(loc_current.to(dt)).permute(0, 2, 3, 1, 4, 5)       # (T, M, L, Q, Pc, 2)
    attn_c = attn_current.to(dt).permute(0, 2, 3, 1, 4)                # (T, M, L, Q, Pc)
    out = value.new_zeros(T * M, D, Q)
    for lvl, vmap in enumerate(maps):
        g = grid_c[:, :, lvl].reshape(T * M, Q, Pc, 2)
        samp = F.grid_sample(vmap, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (samp * attn_c[:, :, lvl].reshape(T * M, 1, Q, Pc)).sum(-1)

    if W > 0:
        out = out + _temporal_reference(maps, frames, loc_temporal.to(dt), attn_temporal.to(dt), T, M, D, Q)
    return out.view(T, M, D, Q).permute(0, 3, 1, 2).reshape(T, Q, M * D)


def _temporal_reference(maps, frames, loc_t, attn_t, T, M, D, Q):
    """Temporal branch of the reference; returns (T*M, D, Q) summed over slots, levels and points."""
    W, L, Pt = loc_t.shape[3], loc_t.shape[4], loc_t.shape[5]
    src = frames.reshape(-1)                                            # (T*W,) frame read by pair
    dst = torch.arange(T, device=src.device).repeat_interleave(W)       # (T*W,) query frame of pair
    order = torch.sort(src, stable=True).indices
    src_sorted, dst_sorted = src[order], dst[order]
    counts = torch.bincount(src_sorted, minlength=T)
    K = int(counts.max())
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(T * W, device=src.device) - group_start[src_sorted]

    # (t, w) pairs regrouped as (source frame f, rank k); unused ranks read far outside the map
    pair_loc = loc_t.permute(0, 3, 2, 4, 1, 5, 6).reshape(T * W, M, L, Q, Pt, 2)[order]
    pair_attn = attn_t.permute(0, 3, 2, 4, 1, 5).reshape(T * W, M, L, Q, Pt)[order]
    grid = loc_t.new_full((T, K, M, L, Q, Pt, 2), _OUTSIDE).index_put((src_sorted, rank), _grid(pair_loc))
    attn = attn_t.new_zeros((T, K, M, L, Q, Pt)).index_put((src_sorted, rank), pair_attn)
    grid = grid.permute(0, 2, 3, 1, 4, 5, 6)                            # (T, M, L, K, Q, Pt, 2)
    attn = attn.permute(0, 2, 3, 1, 4, 5)                               # (T, M, L, K, Q, Pt)

    acc = maps[0].new_zeros(T * M, D, K * Q)
    for lvl, vmap in enumerate(maps):
        g = grid[:, :, lvl].reshape(T * M, K * Q, Pt, 2)
        samp = F.grid_sample(vmap, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        acc = acc + (samp * attn[:, :, lvl].reshape(T * M, 1, K * Q, Pt)).sum(-1)
    # back from (source frame, rank) to the query frame that owns the pair, summing its W slots
    acc = acc.view(T, M, D, K, Q)[src_sorted, :, :, rank]               # (T*W, M, D, Q)
    out = acc.new_zeros(T, M, D, Q).index_add(0, dst_sorted, acc)
    return out.reshape(T * M, D, Q)


# ---------------------------------------------------------------------------------------------
# dispatch


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # skipping the no-op .to() saves host time on every call of a sub-millisecond kernel
    return t if t.dtype == dtype else t.to(dtype)


def ms_deform_attn(value, spatial_shapes, level_start_index, loc_current, attn_current,
                   loc_temporal=None, attn_temporal=None, temporal_frames=None, *, backend="auto"):
    """Temporal multi-scale deformable attention (spec §2-§3), one call per clip.

    value (T, S, M, D); spatial_shapes (L, 2) int64 (H_l, W_l); level_start_index (L,) int64;
    loc_current (T, Q, M, L, P_c, 2) normalised (x, y); attn_current (T, Q, M, L, P_c);
    loc_temporal (T, Q, M, W, L, P_t, 2) (slot w of frame t samples frame temporal_frames[t, w]);
    attn_temporal (T, Q, M, W, L, P_t); temporal_frames (T, W) int64, default: for each t the other
    frames in ascending order (W = T-1). Without the temporal arguments every frame is independent,
    so the leading axis is simply a batch of images (the image model passes (B, S, M, D)).
    Attention weights must already be normalised (jointly over current and temporal entries).
    Returns (T, Q, M*D) (heads concatenated in head order), in value's dtype.

    backend: "auto" (the fused CUDA kernel for CUDA tensors when it builds and supports the shapes,
    else the reference), "reference" (``ms_deform_attn_reference``), "cuda" (the kernel; raises
    if it cannot be used). The kernel reads locations and weights in value's dtype, so they are
    cast to it (autograd casts their gradients back).
    """
    if backend not in BACKENDS:
        raise ValueError(f"ms_deform_attn: backend must be one of {BACKENDS}, got {backend!r}")
    args = (value, spatial_shapes, level_start_index, loc_current, attn_current,
            loc_temporal, attn_temporal, temporal_frames)
    if backend == "reference":
        return ms_deform_attn_reference(*args)
    if backend == "auto" and not (isinstance(value, torch.Tensor) and value.is_cuda):
        return ms_deform_attn_reference(*args)

    from devis_core import ops_build  # deferred: importing it pulls in torch.utils.cpp_extension
    num_levels = spatial_shapes.shape[0] if isinstance(spatial_shapes, torch.Tensor) else None
    reason = ops_build.unsupported_reason(value, num_levels)
    if reason is None:
        try:
            ops_build.load_extension()
        except ops_build.OpsBuildError as err:
            if backend == "cuda":
                raise
            reason = str(err)
    if reason is not None:
        if backend == "cuda":
            raise RuntimeError(f"ms_deform_attn(backend='cuda'): {reason}")
        ops_build.warn_fallback(reason)
        return ms_deform_attn_reference(*args)

    T, S, M, D, L, Q, Pc, W, Pt, frames = _check_inputs(*args)
    dt = value.dtype
    if W == 0:
        loc_temporal = attn_temporal = None
        frames = torch.zeros(T, 0, dtype=torch.long, device=value.device)
    else:
        loc_temporal, attn_temporal = _as_dtype(loc_temporal, dt), _as_dtype(attn_temporal, dt)
    kernel_args = (value, spatial_shapes, level_start_index, _as_dtype(loc_current, dt),
                   _as_dtype(attn_current, dt), loc_temporal, attn_temporal, frames)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in kernel_args)):
        return ops_build.kernel_forward(*kernel_args)[0]
    return ops_build.MSDeformAttnFunction.apply(*kernel_args)
