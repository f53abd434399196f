"""Benchmark of temporal deformable attention at DeVIS shapes (issue 3, item 5).

Columns per (case, dtype, pass): the fused kernel; the official call pattern (per frame, the plain
multi-scale op on the frame, then on the W other frames gathered and concatenated as W*L
pseudo-levels, spec §3.3), built from the same kernel source; the PyTorch reference; the
bytes-moved floor (every input read once, every output written once, over the measured
device-to-device bandwidth) and the kernel's ratio to it; the extra peak memory of each path
beyond its inputs. CUDA events, warm-up, median of many runs.

Run ``python -m devis_core.benchmarks.attention --out results.json`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from devis_core.attention import default_temporal_frames, ms_deform_attn

__all__ = ["Case", "DEVIS_CASES", "TINY_CASES", "level_shapes", "make_inputs", "official_call_pattern",
           "measure_bandwidth", "run_benchmark", "format_table", "save_results"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One benchmark shape. kind: 'encoder' (queries = every token) or 'decoder' (N_q per frame)."""
    name: str
    kind: str
    height: int
    width: int
    frames: int = 6
    heads: int = 8
    head_dim: int = 32
    levels: int = 4
    points_current: int = 4
    points_temporal: int = 4
    queries: int = 0              # decoder: N_q per frame


DEVIS_CASES = [
    Case("encoder 360x640", "encoder", 360, 640),
    Case("encoder 480x864", "encoder", 480, 864),
    Case("decoder N_q=10", "decoder", 360, 640, queries=10),
    Case("decoder N_q=30", "decoder", 360, 640, queries=30),
]
TINY_CASES = [Case("tiny encoder", "encoder", 64, 96, frames=3, heads=2, head_dim=16),
              Case("tiny decoder", "decoder", 64, 96, frames=3, heads=2, head_dim=16, queries=5)]


def level_shapes(height: int, width: int, levels: int = 4) -> list[tuple[int, int]]:
    """(H_l, W_l) of the ResNet-50 strides 8, 16, 32, 64 (each stride-2 conv rounds up)."""
    h, w, out = height, width, []
    for i in range(3 + levels):
        h, w = (h + 1) // 2, (w + 1) // 2
        if i >= 2:
            out.append((h, w))
    return out[:levels]


def _head_directions(M: int, device) -> torch.Tensor:
    """(M, 2) the init direction of each head (spec §2): unit square boundary at angle 2*pi*m/M."""
    th = torch.arange(M, device=device, dtype=torch.float32) * (2 * math.pi / M)
    d = torch.stack([th.cos(), th.sin()], -1)
    return d / d.abs().max(-1, keepdim=True).values


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Inputs with DeVIS-like geometry: offsets are the init pattern (p+1)*d_m plus N(0, 1) pixels,
    around each token's own position (encoder) or around per-slot boxes (decoder, instance-aware:
    slot w reads around the same query slot's box in frame temporal_frames[t, w]); weights are a
    joint softmax of random logits. Returns a dict of the op's arguments."""
    g = torch.Generator(device=device).manual_seed(seed)
    T, M, D, L, Pc, Pt = case.frames, case.heads, case.head_dim, case.levels, case.points_current, case.points_temporal
    shapes = torch.tensor(level_shapes(case.height, case.width, L), dtype=torch.long, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    frames = default_temporal_frames(T, device=device)
    W = frames.shape[1]
    wh = shapes.flip(1).float()                                          # (L, 2) as (W_l, H_l)
    dirs = _head_directions(M, device)

    if case.kind == "encoder":
        refs = []
        for h, w in shapes.tolist():
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
        ref = torch.cat(refs)                                            # (S, 2) own position
        Q = S
        ref_c = ref.view(1, Q, 1, 1, 1, 2).expand(T, Q, M, L, 1, 2)
        ref_t = ref.view(1, Q, 1, 1, 1, 1, 2).expand(T, Q, M, W, L, 1, 2)
        scale_c = 1.0 / wh.view(1, 1, 1, L, 1, 2)
        scale_t = 1.0 / wh.view(1, 1, 1, 1, L, 1, 2)
    elif case.kind == "decoder":
        Q = case.queries
        boxes = torch.cat([0.1 + 0.8 * torch.rand(T, Q, 2, device=device, generator=g),
                           0.05 + 0.45 * torch.rand(T, Q, 2, device=device, generator=g)], -1)
        ref_c = boxes[:, :, None, None, None, :2]
        other = boxes[frames]                                            # (T, W, Q, 4)
        ref_t = other.permute(0, 2, 1, 3)[:, :, None, :, None, None, :2]
        scale_c = boxes[:, :, None, None, None, 2:] * 0.5 / Pc
        scale_t = other.permute(0, 2, 1, 3)[:, :, None, :, None, None, 2:] * 0.5 / Pt
    else:
        raise ValueError(f"Case {case.name!r}: kind must be 'encoder' or 'decoder', got {case.kind!r}")
    pat_c = dirs.view(1, 1, M, 1, 1, 2) * torch.arange(1, Pc + 1, device=device).view(1, 1, 1, 1, Pc, 1)
    pat_t = dirs.view(1, 1, M, 1, 1, 1, 2) * torch.arange(1, Pt + 1, device=device).view(1, 1, 1, 1, 1, Pt, 1)
    off_c = pat_c + torch.randn(T, Q, M, L, Pc, 2, device=device, generator=g)
    off_t = pat_t + torch.randn(T, Q, M, W, L, Pt, 2, device=device, generator=g)
    loc_c = ref_c + off_c * scale_c
    loc_t = ref_t + off_t * scale_t
    logits = torch.randn(T, Q, M, L * Pc + W * L * Pt, device=device, generator=g).softmax(-1)
    attn_c = logits[..., :L * Pc].reshape(T, Q, M, L, Pc)
    attn_t = logits[..., L * Pc:].reshape(T, Q, M, W, L, Pt)
    value = torch.randn(T, S, M, D, device=device, generator=g)
    cast = lambda x: x.to(dtype).contiguous()                            # noqa: E731
    return dict(value=cast(value), spatial_shapes=shapes, level_start_index=starts,
                loc_current=cast(loc_c), attn_current=cast(attn_c), loc_temporal=cast(loc_t),
                attn_temporal=cast(attn_t), temporal_frames=frames)


def official_call_pattern(value, spatial_shapes, level_start_index, loc_current, attn_current,
                          loc_temporal, attn_temporal, temporal_frames, backend="auto"):
    """Spec §3.3: per frame t, the plain op on V[t] and on V[F_t] gathered into (1, W*S, M, D)
    with W*L pseudo-levels; the two outputs summed. Same arguments/returns as ms_deform_attn."""
    T, S, M, D = value.shape
    Q, W, L, Pt = loc_current.shape[1], loc_temporal.shape[3], loc_current.shape[3], loc_temporal.shape[5]
    shapes_rep = spatial_shapes.repeat(W, 1)
    sizes = shapes_rep.prod(1)
    starts_rep = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    outs = []
    for t in range(T):
        cur = ms_deform_attn(value[t:t + 1], spatial_shapes, level_start_index, loc_current[t:t + 1],
                             attn_current[t:t + 1], backend=backend)
        # advanced indexing materialises the (W, S, M, D) copy, as the official code's
        # concatenation of the other frames does: that copy is part of the pattern's cost
        gathered = value[temporal_frames[t]].reshape(1, W * S, M, D)
        tmp = ms_deform_attn(gathered, shapes_rep, starts_rep,
                             loc_temporal[t:t + 1].reshape(1, Q, M, W * L, Pt, 2),
                             attn_temporal[t:t + 1].reshape(1, Q, M, W * L, Pt), backend=backend)
        outs.append(cur + tmp)
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# measurement


def measure_bandwidth(device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), reps=reps, warmup=3)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def _time(fn, reps: int, warmup: int) -> float:
    """Median milliseconds of fn() over reps runs, CUDA events around each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _time_cpu(fn, reps: int, warmup: int) -> float:
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bytes(inputs: dict, backward: bool) -> int:
    """Fewest bytes the op must move: inputs read and outputs written once (plus the gradients)."""
    v, lc, ac, lt, at = (inputs[k] for k in ("value", "loc_current", "attn_current", "loc_temporal", "attn_temporal"))
    el = v.element_size()
    T, S, M, D = v.shape
    out = T * lc.shape[1] * M * D
    fwd = (v.numel() + lc.numel() + ac.numel() + lt.numel() + at.numel() + out) * el
    if not backward:
        return fwd
    # backward reads value, locations, weights, grad_out; writes the gradients of all five
    bwd = (2 * (v.numel() + lc.numel() + ac.numel() + lt.numel() + at.numel()) + out) * el
    return fwd + bwd


def _paths(inputs: dict, on_cuda: bool):
    args = [inputs[k] for k in ("value", "spatial_shapes", "level_start_index", "loc_current",
                                "attn_current", "loc_temporal", "attn_temporal", "temporal_frames")]
    paths = {"reference": lambda *a: ms_deform_attn(*a, backend="reference")}
    if on_cuda:
        paths = {"kernel": lambda *a: ms_deform_attn(*a, backend="cuda"),
                 "official pattern": lambda *a: official_call_pattern(*a, backend="cuda"),
                 **paths}
    return args, paths


def _measure_path(fn, args, backward: bool, on_cuda: bool, budget_ms: float, max_reps: int):
    """(median ms, extra peak MiB beyond the inputs or None on CPU) of fn's forward or fwd+bwd."""
    diff = (0, 3, 4, 5, 6)                  # value, locations and weights
    if backward:
        leaves = [a.detach().requires_grad_(True) if i in diff else a for i, a in enumerate(args)]
        grad = torch.randn(leaves[0].shape[0], leaves[3].shape[1], leaves[0].shape[2] * leaves[0].shape[3],
                           device=leaves[0].device).to(leaves[0].dtype)
        diff_leaves = [leaves[i] for i in diff]

        def run():
            out = fn(*leaves)
            return torch.autograd.grad(out, diff_leaves, grad)
    else:
        def run():
            with torch.no_grad():
                return fn(*args)
    timer = _time if on_cuda else _time_cpu
    if on_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    first = timer(run, reps=1, warmup=1)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if on_cuda else None
    reps = int(max(3, min(max_reps, budget_ms / max(first, 1e-3))))
    return timer(run, reps=reps, warmup=2), peak


def run_benchmark(cases=None, dtypes=("float32", "float16", "bfloat16"), device=None,
                  passes=("forward", "forward+backward"), budget_ms: float = 2000.0, max_reps: int = 200,
                  reference: bool = True, verbose: bool = True) -> dict:
    """Time every path at every (case, dtype, pass); returns {'device', 'bandwidth_GBps', 'rows'}.

    Without CUDA only the reference is timed (on the CPU; cases should then be tiny).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    cases = cases or (DEVIS_CASES if on_cuda else TINY_CASES)
    bw = measure_bandwidth(device) if on_cuda else None
    rows = []
    for case in cases:
        for dname in dtypes:
            dtype = DTYPES[dname]
            if not on_cuda and dtype != torch.float32:
                continue                              # half-precision grid_sample on CPU is not the point
            inputs = make_inputs(case, dtype, device)
            args, paths = _paths(inputs, on_cuda)
            if not reference:
                paths.pop("reference")
            for pname in passes:
                backward = pname != "forward"
                row = dict(case=case.name, dtype=dname, pass_=pname)
                for path, fn in paths.items():
                    ms, peak = _measure_path(fn, args, backward, on_cuda, budget_ms, max_reps)
                    row[f"{path} ms"] = ms
                    row[f"{path} peak MiB"] = peak
                floor_ms = _bytes(inputs, backward) / bw * 1e3 if bw else None
                row["floor ms"] = floor_ms
                if on_cuda:
                    row["kernel / floor"] = row["kernel ms"] / floor_ms
                    row["speed-up vs official"] = row["official pattern ms"] / row["kernel ms"]
                rows.append(row)
                if verbose:
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del inputs, args
            if on_cuda:
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    return dict(device=name, bandwidth_GBps=(bw / 1e9 if bw else None), torch=torch.__version__,
                cases=[asdict(c) for c in cases], rows=rows)


def format_table(results: dict) -> str:
    """Markdown table of run_benchmark's rows (times in ms, peaks in MiB)."""
    rows = results["rows"]
    if not rows:
        return "(no rows)"
    cols = [c for c in rows[0] if c not in ("case", "dtype", "pass_")]
    head = "| case | dtype | pass | " + " | ".join(cols) + " |"
    sep = "|" + "---|" * (3 + len(cols))

    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if v < 100 else f"{v:.0f}"
        return str(v)

    lines = [head, sep] + ["| " + " | ".join([r["case"], r["dtype"], r["pass_"]] + [fmt(r[c]) for c in cols]) + " |"
                           for r in rows]
    return "\n".join(lines)


def save_results(results: dict, path) -> None:
    """Write results as JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the results JSON here")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--cases", default="all", help="comma-separated case names, 'all' or 'tiny'")
    ap.add_argument("--budget-ms", type=float, default=2000.0, help="time spent per measurement")
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference column")
    a = ap.parse_args(argv)
    pool = {c.name: c for c in DEVIS_CASES + TINY_CASES}
    if a.cases == "all":
        cases = None
    elif a.cases == "tiny":
        cases = TINY_CASES
    else:
        unknown = [n for n in a.cases.split(",") if n not in pool]
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; known: {sorted(pool)}")
        cases = [pool[n] for n in a.cases.split(",")]
    dtypes = [d for d in a.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"--dtypes: unknown {bad}; known: {sorted(DTYPES)}")
    res = run_benchmark(cases, dtypes, budget_ms=a.budget_ms, reference=not a.no_reference)
    if a.out:
        save_results(res, a.out)
    print(f"device: {res['device']}, copy bandwidth: {res['bandwidth_GBps']} GB/s")
    print(format_table(res))


if __name__ == "__main__":
    main()
