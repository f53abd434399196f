"""Build, cache and bind the fused temporal deformable-attention CUDA kernel (``ops/src``).

The kernel is compiled just in time with ninja through ``torch.utils.cpp_extension.load`` on first
use and cached under ``$DEVIS_OPS_CACHE`` (default ``~/.cache/devis_ops``) in a folder named by a
hash of the sources, torch/CUDA versions, target architectures and flags, so editing the sources
rebuilds it and an unchanged tree reuses it. A module built ahead of time (``pip install ./ops``,
module ``devis_temporal_msda``) is used instead when it was built from the same sources.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import os
import shutil
import warnings
from pathlib import Path

import torch

__all__ = [
    "OpsBuildError",
    "SOURCE",
    "find_cuda_home",
    "arch_list",
    "build_dir",
    "load_extension",
    "unsupported_reason",
    "poison_outputs",
    "MSDeformAttnFunction",
]

SOURCE = Path(__file__).resolve().parent.parent / "ops" / "src" / "temporal_msda.cu"
AOT_MODULE = "devis_temporal_msda"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64)
MAX_LEVELS = 32                                     # kMaxLevels in the kernel
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]

_EXT = None
_WARNED: set[str] = set()
_POISON: float | None = None


class OpsBuildError(RuntimeError):
    """The CUDA extension cannot be built or loaded here (no toolkit, no CUDA torch, compile error)."""


# ---------------------------------------------------------------------------------------------
# toolkit discovery


def _toolkit_problem(root: str) -> str | None:
    """Why `root` is not a usable CUDA toolkit root (None if it is)."""
    p = Path(root)
    if not (p / "bin" / "nvcc").is_file():
        return "no bin/nvcc"
    if not (p / "include" / "cuda_runtime.h").is_file():
        return "no include/cuda_runtime.h"
    if not any((p / d / "libcudart.so").exists() for d in ("lib64", "lib", "targets/x86_64-linux/lib",
                                                           "targets/sbsa-linux/lib")):
        return "no lib64/libcudart.so"
    return None


def _default_roots() -> list[str]:
    """Conventional toolkit locations, newest versioned folder first."""
    return ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]


def find_cuda_home() -> str:
    """Root of the CUDA toolkit to compile with; raises OpsBuildError naming every place tried.

    Order: $DEVIS_CUDA_HOME, $CUDA_HOME, $CUDA_PATH, the toolkit that the nvcc on $PATH belongs to
    (a wrapper script such as /usr/local/bin/nvcc is followed to the nvcc it runs), /usr/local/cuda,
    /usr/local/cuda-*, /opt/cuda. A candidate must hold bin/nvcc, include/cuda_runtime.h and
    libcudart.so; torch's own guess (the parent of nvcc's folder) fails when nvcc is a wrapper.
    """
    tried: list[tuple[str, str]] = []
    candidates: list[tuple[str, str]] = []
    for var in ("DEVIS_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((f"${var}", os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(("nvcc on PATH", str(Path(real).parent.parent)))
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if os.path.getsize(real) < 4096:            # a shell wrapper, not the compiler
                for word in Path(real).read_text().split():
                    word = word.strip("\"'")
                    if word.endswith("/nvcc") and os.path.isfile(word):
                        candidates.append(("nvcc wrapper target", str(Path(os.path.realpath(word)).parent.parent)))
    candidates += [("default", d) for d in _default_roots()]
    for origin, root in candidates:
        problem = _toolkit_problem(root)
        if problem is None:
            return str(Path(root).resolve())
        tried.append((f"{origin}: {root}", problem))
    lines = "\n".join(f"  - {where} ({why})" for where, why in tried)
    raise OpsBuildError("no CUDA toolkit found to build the temporal attention kernel; looked for "
                        "bin/nvcc, include/cuda_runtime.h and lib64/libcudart.so in:\n" + lines +
                        "\nSet DEVIS_CUDA_HOME (or CUDA_HOME) to the toolkit root, or install the "
                        "prebuilt module with `pip install ./ops` on a machine that has one.")


def arch_list() -> list[str]:
    """Compute capabilities to compile for, e.g. ['9.0'].

    $DEVIS_CUDA_ARCH (e.g. "9.0;8.0") wins; else the visible GPUs; else 9.0 (H100/H200), the
    target of the project's machines, so a CPU-only build still produces a usable binary.
    """
    env = os.environ.get("DEVIS_CUDA_ARCH")
    if env:
        return sorted({a.strip() for a in env.replace(",", ";").split(";") if a.strip()})
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return sorted(f"{major}.{minor}" for major, minor in caps)
    return ["9.0"]


def _gencode(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        num = a.replace(".", "").replace("+PTX", "")
        if not num.isdigit():
            raise OpsBuildError(f"DEVIS_CUDA_ARCH: expected entries like '9.0', got {a!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def source_hash() -> str:
    """sha256 of the kernel source (embedded in built modules to spot stale ones)."""
    if not SOURCE.is_file():
        raise OpsBuildError(f"kernel source not found: {SOURCE}")
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def build_dir(archs: list[str] | None = None) -> Path:
    """Cache folder of the JIT build for the current sources, torch, CUDA and targets."""
    archs = arch_list() if archs is None else archs
    key = "|".join([source_hash(), torch.__version__, str(torch.version.cuda), ";".join(archs),
                    " ".join(NVCC_FLAGS)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("DEVIS_OPS_CACHE", Path.home() / ".cache" / "devis_ops"))
    return root / digest


# ---------------------------------------------------------------------------------------------
# loading


def _load_aot(src_hash: str | None):
    """The ahead-of-time module if installed and built from these sources (or sources are absent)."""
    try:
        mod = importlib.import_module(AOT_MODULE)
    except ImportError:
        return None
    if src_hash is None or getattr(mod, "source_hash", None) == f"h{src_hash}":
        return mod
    warn_fallback(f"installed {AOT_MODULE} was built from other sources than {SOURCE}; "
                  "compiling the current ones instead (reinstall ./ops to update it)", RuntimeWarning)
    return None


def load_extension(verbose: bool = False):
    """Return the compiled extension module (build it on first use); raises OpsBuildError."""
    global _EXT
    if _EXT is not None:
        return _EXT
    if torch.version.cuda is None:
        raise OpsBuildError(f"torch {torch.__version__} is a CPU-only build; the CUDA kernel needs a "
                            "CUDA build of torch")
    src_hash = source_hash() if SOURCE.is_file() else None
    aot = _load_aot(src_hash)
    if aot is not None:
        _EXT = aot
        return _EXT
    if src_hash is None:
        raise OpsBuildError(f"kernel source {SOURCE} missing and {AOT_MODULE} not installed")
    _EXT = _jit_build(src_hash, verbose)
    return _EXT


def _jit_build(src_hash: str, verbose: bool):
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_ext
    # cpp_extension guessed its CUDA_HOME at import time, possibly from a wrapper's location
    cpp_ext.CUDA_HOME = cuda_home
    archs = arch_list()
    out = build_dir(archs)
    out.mkdir(parents=True, exist_ok=True)
    name = f"devis_temporal_msda_{out.name}"
    try:
        return cpp_ext.load(
            name=name, sources=[str(SOURCE)], build_directory=str(out), verbose=verbose,
            extra_cflags=["-O3"],
            extra_cuda_cflags=NVCC_FLAGS + _gencode(archs) + [f"-DDEVIS_SOURCE_HASH=h{src_hash}"],
            with_cuda=True)
    except (RuntimeError, OSError, ImportError) as err:
        raise OpsBuildError(f"building the temporal attention kernel from {SOURCE} in {out} failed "
                            f"(CUDA_HOME={cuda_home}, archs={archs}): {err}") from err


def unsupported_reason(value: torch.Tensor, num_levels: int | None = None) -> str | None:
    """Why the kernel cannot take this call (None if it can). value: (T, S, M, D)."""
    if not value.is_cuda:
        return f"value is on {value.device}, the kernel needs CUDA tensors"
    if value.dtype not in SUPPORTED_DTYPES:
        return f"value dtype {value.dtype} not in {SUPPORTED_DTYPES}"
    if value.dim() == 4 and value.shape[3] not in SUPPORTED_HEAD_DIMS:
        return f"head dim D={value.shape[3]} not in {SUPPORTED_HEAD_DIMS}"
    if num_levels is not None and num_levels > MAX_LEVELS:
        return f"{num_levels} levels, the kernel takes at most {MAX_LEVELS}"
    return None


def warn_fallback(msg: str, category=RuntimeWarning) -> None:
    """Warn once per distinct message (the fallback happens on every call otherwise)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"temporal attention: {msg}; using the PyTorch reference", category, stacklevel=3)


@contextlib.contextmanager
def poison_outputs(fill: float = float("nan")):
    """Inside the block the kernel's outputs start filled with `fill` instead of uninitialised
    memory, so a test sees any element the kernel fails to write."""
    global _POISON
    old, _POISON = _POISON, fill
    try:
        yield
    finally:
        _POISON = old


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernel reads 4 channels per vector load)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _long_on(t: torch.Tensor, device) -> torch.Tensor:
    """Contiguous int64 on ``device``; the tensor itself when it already is (the usual case: a no-op
    ``.to`` still costs microseconds of host time per call)."""
    if t.dtype == torch.long and t.device == device and t.is_contiguous():
        return t
    return t.to(device=device, dtype=torch.long).contiguous()


def kernel_forward(value, spatial_shapes, level_start_index, loc_c, attn_c, loc_t, attn_t, frames,
                   count_cells: bool = False):
    """The fused forward (arguments as :class:`MSDeformAttnFunction`), without autograd.

    Returns (out (T, Q, M*D), the contiguous inputs the backward needs, counts). With
    ``count_cells`` the kernel also counts the samples of every value-gradient cell into counts
    (int32 (ext.num_cells(T, S, M, L),)), which the backward's sort needs; otherwise counts is None.
    Called directly when no gradient is needed: the autograd node would cost host time the GPU
    spends idle in front of a sub-millisecond kernel.
    """
    ext = load_extension()
    value = _aligned(value)
    shapes = _long_on(spatial_shapes, value.device)
    starts = _long_on(level_start_index, value.device)
    loc_c, attn_c = loc_c.contiguous(), attn_c.contiguous()
    if loc_t is None:                       # the image case: the kernel takes empty temporal arguments
        loc_t = attn_t = value.new_empty(0)
    else:
        loc_t, attn_t = loc_t.contiguous(), attn_t.contiguous()
    frames = _long_on(frames, value.device)
    out, counts = ext.forward(value, shapes, starts, loc_c, attn_c, loc_t, attn_t, frames, count_cells, _POISON)
    return out, (value, shapes, starts, loc_c, attn_c, loc_t, attn_t, frames), counts if count_cells else None


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd binding of the fused kernel; arguments as ``attention.ms_deform_attn`` after its
    checks: every floating tensor in value's dtype, temporal_frames (T, W) int64 (W may be 0, then
    loc_temporal / attn_temporal are None). Returns (T, Q, M*D)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, loc_c, attn_c, loc_t, attn_t, frames):
        out, saved, counts = kernel_forward(value, spatial_shapes, level_start_index, loc_c, attn_c, loc_t,
                                            attn_t, frames, count_cells=True)
        ctx.save_for_backward(*saved, counts)
        ctx.has_temporal = saved[5].numel() > 0
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ext = load_extension()
        value, shapes, starts, loc_c, attn_c, loc_t, attn_t, frames, counts = ctx.saved_tensors
        grad_out = _aligned(grad_out if grad_out.dtype == value.dtype else grad_out.to(value.dtype))
        g_value, g_loc_c, g_attn_c, g_loc_t, g_attn_t = ext.backward(
            value, shapes, starts, loc_c, attn_c, loc_t, attn_t, frames, grad_out, counts, _POISON)
        if not ctx.has_temporal:
            g_loc_t = g_attn_t = None
        return g_value, None, None, g_loc_c, g_attn_c, g_loc_t, g_attn_t, None
