"""Ahead-of-time build of the fused temporal deformable-attention kernel (module devis_temporal_msda).

For clusters whose compute nodes have no CUDA compiler: build on a node that has one, with the
same torch as at run time, e.g.

    pip install --no-build-isolation ./ops            # or: cd ops && python setup.py build_ext --inplace
    DEVIS_CUDA_ARCH="8.0;9.0" pip install --no-build-isolation ./ops   # choose target GPUs

devis_core.ops_build uses the installed module when it was built from the current sources
(it carries their sha256) and otherwise compiles just in time.
"""
import hashlib
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "src" / "temporal_msda.cu"


def gencode_flags():
    archs = os.environ.get("DEVIS_CUDA_ARCH", "9.0")
    flags = []
    for a in archs.replace(",", ";").split(";"):
        num = a.strip().replace(".", "")
        if not num.isdigit():
            raise SystemExit(f"DEVIS_CUDA_ARCH: expected entries like '9.0', got {a!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


src_hash = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
setup(
    name="devis-temporal-msda",
    version="0.1.0",
    description="DeVIS temporal multi-scale deformable attention (fused CUDA kernel)",
    ext_modules=[CUDAExtension(
        name="devis_temporal_msda",
        sources=[str(SOURCE.relative_to(HERE))],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", f"-DDEVIS_SOURCE_HASH=h{src_hash}"]
                            + gencode_flags()},
    )],
    cmdclass={"build_ext": BuildExtension},
)
