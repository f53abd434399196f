"""Launch-configuration sweep of the fused temporal attention kernel (run on a GPU machine).

Builds ops/src/temporal_msda.cu once per variant (compile-time macros, built in parallel in
separate processes), then times the raw forward and backward kernels (no Python wrapper, CUDA
events, median) at the DeVIS encoder shape 360x640 T=6 (float32, bfloat16) and the decoder
N_q=30 (float32), and checks that every variant computes what the first one computes.

    python ops/tune_launch.py --variants base,chunk32 --baseline old_temporal_msda.cu --out tune.json

A variant is a name from VARIANTS; --baseline adds the variant "baseline", built from another copy of
the source (an earlier kernel with binding api 1 or 3, e.g. from `git show REV:ops/src/temporal_msda.cu`),
so a change is timed against its predecessor in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devis_core import ops_build  # noqa: E402
from devis_core.benchmarks.attention import DEVIS_CASES, _time, make_inputs  # noqa: E402

# Tuning builds compile only the float32 / bfloat16, D = 32 instantiations (the timed cases).
_ONLY_D32 = [("case 16: f(tag, std::integral_constant<int, 16>{}); break;", ""),
             ("case 64: f(tag, std::integral_constant<int, 64>{}); break;", ""),
             ("case at::kHalf: by_dim(at::Half{}); break;", "")]
VARIANTS = {
    "base": {},
    "noswizzle": {"DEVIS_TILE_SWIZZLE": 0},
    "swizzleall": {"DEVIS_TILE_SWIZZLE": 2},
    "fwd3": {"DEVIS_FWD_MIN_BLOCKS": 3},
    "bwd3": {"DEVIS_BWD_MIN_BLOCKS": 3},
    "batch4": {"DEVIS_FWD_BATCH": 4, "DEVIS_BWD_BATCH": 4},
    "chunk32": {"DEVIS_BIN_CHUNK": 32},
    "chunk128": {"DEVIS_BIN_CHUNK": 128},
    "vg8x2": {"DEVIS_BIN_BATCH": 8, "DEVIS_BIN_MIN_BLOCKS": 2},
    "narrowvg": {"DEVIS_BIN_WIDE": 0},
}
CASES = [("encoder 360x640", torch.float32), ("encoder 360x640", torch.bfloat16), ("decoder N_q=30", torch.float32)]


def _build(name: str, macros: dict, workdir: str) -> str:
    """Compile one variant into workdir/name; returns the module name (import happens later)."""
    import torch.utils.cpp_extension as cpp_ext
    cuda_home = ops_build.find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_ext.CUDA_HOME = cuda_home
    source = Path(macros.get("_source", ops_build.SOURCE))
    src = source.read_text()
    for old, new in _ONLY_D32 + macros.get("_patch", []):
        if old not in src:
            raise RuntimeError(f"variant {name}: patch target {old!r} not in {source}")
        src = src.replace(old, new)
    out = Path(workdir) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "k.cu").write_text(src)
    flags = [f"-D{k}={v}" for k, v in macros.items() if not k.startswith("_")]
    mod = f"tune_{name}"
    cpp_ext.load(name=mod, sources=[str(out / "k.cu")], build_directory=str(out), extra_cflags=["-O3"],
                 extra_cuda_cflags=ops_build.NVCC_FLAGS + ops_build._gencode(ops_build.arch_list()) + flags,
                 with_cuda=True, verbose=False)
    return mod


def _load(name: str, macros: dict, workdir: str):
    import torch.utils.cpp_extension as cpp_ext
    out = Path(workdir) / name
    flags = [f"-D{k}={v}" for k, v in macros.items() if not k.startswith("_")]
    return cpp_ext.load(name=f"tune_{name}", sources=[str(out / "k.cu")], build_directory=str(out),
                        extra_cflags=["-O3"],
                        extra_cuda_cflags=ops_build.NVCC_FLAGS + ops_build._gencode(ops_build.arch_list()) + flags,
                        with_cuda=True, verbose=False)


def _kernel_args(inp: dict):
    v = inp["value"]
    return (v, inp["spatial_shapes"], inp["level_start_index"], inp["loc_current"], inp["attn_current"],
            inp["loc_temporal"], inp["attn_temporal"], inp["temporal_frames"])


def measure(ext, inp: dict) -> dict:
    """Raw kernel times (ms) and outputs of one module on one input set.

    fwd: the forward alone (inference); fwd_count: the forward as training runs it, also counting the
    value-gradient cells (binding api 3; earlier kernels counted in the backward, there it is fwd);
    bwd: the backward (api 3: with its buffers' allocation and the value gradient's cast, as the
    autograd binding runs it); fwd_count + bwd is the figure that compares across bindings.
    """
    args = _kernel_args(inp)
    v, lc, ac, lt, at = args[0], args[3], args[4], args[5], args[6]
    T, _, M, D = v.shape
    out = torch.empty(T, lc.shape[1], M * D, dtype=v.dtype, device=v.device)
    go = torch.randn(out.shape, device=v.device, generator=torch.Generator(v.device).manual_seed(1)).to(v.dtype)
    gv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    glc, gac, glt, gat = (torch.empty_like(x) for x in (lc, ac, lt, at))
    api3 = getattr(ext, "api", 1) >= 3
    if api3:
        res = {}
        fwd = _time(lambda: ext.forward(*args, False), reps=30, warmup=3)

        def fwd_count():
            res["out"], res["counts"] = ext.forward(*args, True)
        fwd_count_ms = _time(fwd_count, reps=30, warmup=3)
        fwd_count()

        def bwd():
            res["grads"] = ext.backward(*args, go, res["counts"])
    else:
        fwd = fwd_count_ms = _time(lambda: ext.forward(*args, out), reps=30, warmup=3)

        def bwd():
            gv.zero_()
            ext.backward(*args, go, gv, glc, gac, glt, gat)
    bwd_ms = _time(bwd, reps=30, warmup=3)
    bwd()
    if api3:                                 # api 1 wrote into these buffers in place
        out.copy_(res["out"])
        for dst, src in zip((gv, glc, gac, glt, gat), res["grads"]):
            dst.copy_(src)
    torch.cuda.synchronize()
    return dict(fwd=fwd, fwd_count=fwd_count_ms, bwd=bwd_ms,
                outs=[out.float(), gv, glc.float(), gac.float(), glt.float(), gat.float()])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--baseline", type=Path, help="another temporal_msda.cu, timed as variant 'baseline'")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    if a.baseline:
        if not a.baseline.is_file():
            raise SystemExit(f"--baseline: {a.baseline} is not a file")
        VARIANTS["baseline"] = {"_source": str(a.baseline.resolve())}
        names.append("baseline")
    workdir = tempfile.mkdtemp(prefix="devis_tune_")
    with ProcessPoolExecutor(max_workers=len(names)) as pool:
        futs = {n: pool.submit(_build, n, VARIANTS[n], workdir) for n in names}
        for n, f in futs.items():
            f.result()
    inputs = {}
    for cname, dt in CASES:
        case = next(c for c in DEVIS_CASES if c.name == cname)
        inputs[(cname, dt)] = make_inputs(case, dt, "cuda")
    rows, first = [], {}
    for n in names:
        ext = _load(n, VARIANTS[n], workdir)
        for key, inp in inputs.items():
            r = measure(ext, inp)
            errs = []
            if key in first:
                for i, (x, y) in enumerate(zip(r["outs"], first[key])):
                    errs.append(((x - y).norm() / y.norm().clamp_min(1e-30)).item())
            else:
                first[key] = r["outs"]
            rows.append(dict(variant=n, case=key[0], dtype=str(key[1]).replace("torch.", ""),
                             fwd_ms=r["fwd"], fwd_count_ms=r["fwd_count"], bwd_ms=r["bwd"],
                             train_ms=r["fwd_count"] + r["bwd"], max_rel_vs_first=max(errs) if errs else 0.0))
            print(rows[-1], flush=True)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    print("| variant | case | dtype | fwd ms | fwd+count ms | bwd ms | fwd+count+bwd ms | rel. diff vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['case']} | {r['dtype']} | {r['fwd_ms']:.3f} | {r['fwd_count_ms']:.3f} | "
              f"{r['bwd_ms']:.3f} | {r['train_ms']:.3f} | {r['max_rel_vs_first']:.1e} |")


if __name__ == "__main__":
    main()
