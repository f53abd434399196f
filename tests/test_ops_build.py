"""Tests of devis_core/ops_build.py: toolkit discovery, cache keys, stale prebuilt modules, and a
real compile + link of ops/src/temporal_msda.cu with nvcc (runs on CPU-only machines too; skipped
only where no CUDA toolkit is installed)."""
import os
import stat
import sys
import types

import pytest
import torch

from devis_core import ops_build


def _fake_toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64" / "libcudart.so").write_text("")
    return root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("DEVIS_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(ops_build, "_default_roots", lambda: [str(tmp_path / "no_cuda_here")])
    return tmp_path


def test_find_cuda_home_follows_nvcc_wrapper(clean_env, monkeypatch):
    # /usr/local/bin/nvcc-style wrapper: its parent's parent is not a toolkit, its target's is
    root = _fake_toolkit(clean_env / "cuda-13.0")
    wrap_dir = clean_env / "usr_local" / "bin"
    wrap_dir.mkdir(parents=True)
    wrapper = wrap_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(wrap_dir))
    assert ops_build.find_cuda_home() == str(root.resolve())


def test_find_cuda_home_prefers_env_and_rejects_bad_roots(clean_env, monkeypatch):
    good = _fake_toolkit(clean_env / "good")
    monkeypatch.setenv("CUDA_HOME", str(clean_env / "bad"))
    monkeypatch.setenv("DEVIS_CUDA_HOME", str(good))
    assert ops_build.find_cuda_home() == str(good.resolve())


def test_find_cuda_home_error_lists_every_place(clean_env, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(clean_env / "bad"))
    with pytest.raises(ops_build.OpsBuildError) as err:
        ops_build.find_cuda_home()
    msg = str(err.value)
    assert f"$CUDA_HOME: {clean_env / 'bad'} (no bin/nvcc)" in msg
    assert "no_cuda_here (no bin/nvcc)" in msg
    assert "DEVIS_CUDA_HOME" in msg


def test_arch_list_and_gencode(monkeypatch):
    monkeypatch.setenv("DEVIS_CUDA_ARCH", "9.0; 8.0")
    assert ops_build.arch_list() == ["8.0", "9.0"]
    assert ops_build._gencode(["9.0"]) == ["-gencode=arch=compute_90,code=sm_90"]
    with pytest.raises(ops_build.OpsBuildError, match="DEVIS_CUDA_ARCH"):
        ops_build._gencode(["sm90"])


def test_build_dir_follows_source_changes(monkeypatch, tmp_path):
    src = tmp_path / "temporal_msda.cu"
    src.write_text("// version 1\n")
    monkeypatch.setattr(ops_build, "SOURCE", src)
    monkeypatch.setenv("DEVIS_OPS_CACHE", str(tmp_path / "cache"))
    first = ops_build.build_dir(["9.0"])
    assert first.parent == tmp_path / "cache"
    assert ops_build.build_dir(["9.0"]) == first                 # stable for the same inputs
    assert ops_build.build_dir(["8.0"]) != first                 # target architecture is part of the key
    src.write_text("// version 2\n")
    assert ops_build.build_dir(["9.0"]) != first


def test_stale_prebuilt_module_is_ignored(monkeypatch):
    src_hash = ops_build.source_hash()
    monkeypatch.setitem(sys.modules, ops_build.AOT_MODULE, types.SimpleNamespace(source_hash="hdeadbeef"))
    with pytest.warns(RuntimeWarning, match="built from other sources"):
        assert ops_build._load_aot(src_hash) is None
    fresh = types.SimpleNamespace(source_hash=f"h{src_hash}")
    monkeypatch.setitem(sys.modules, ops_build.AOT_MODULE, fresh)
    assert ops_build._load_aot(src_hash) is fresh


def test_unsupported_reason():
    assert "needs CUDA" in ops_build.unsupported_reason(torch.zeros(1, 4, 2, 32))
    meta = torch.empty(1, 4, 2, 32, device="meta")
    # meta tensors are not CUDA either; the dtype / head-dim rules are checked on CUDA tensors
    assert ops_build.unsupported_reason(meta) is not None


def _toolkit_or_skip():
    try:
        return ops_build.find_cuda_home()
    except ops_build.OpsBuildError as err:
        pytest.skip(f"no CUDA toolkit: {err}")


def test_jit_build_compiles_and_links(monkeypatch):
    """Compile the kernel for sm_90 with nvcc and link it against torch (no GPU needed)."""
    _toolkit_or_skip()
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch build")
    monkeypatch.setenv("DEVIS_CUDA_ARCH", "9.0")
    monkeypatch.setattr(ops_build, "_EXT", None)
    monkeypatch.setattr(ops_build, "_load_aot", lambda h: None)     # the JIT path itself
    ext = ops_build.load_extension()
    out = ops_build.build_dir(["9.0"])
    libs = [f for f in os.listdir(out) if f.endswith(".so")]
    assert libs, f"no shared library in {out}"
    assert callable(ext.forward) and callable(ext.backward)
    assert ext.source_hash == "h" + ops_build.source_hash()


def test_every_tuning_variant_patches_text_that_exists_in_the_kernel():
    """ops/tune_launch.py builds diagnostic variants by text substitution; a kernel edit that removes a
    patch target would only fail on the GPU machine, after minutes of building."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_launch", ops_build.SOURCE.parents[1] / "tune_launch.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    src = ops_build.SOURCE.read_text()
    patched = 0
    for name, variant in tune.VARIANTS.items():
        for old, _ in tune._ONLY_D32 + variant.get("_patch", []):
            assert src.count(old) == 1, f"variant {name!r}: patch target {old!r} occurs {src.count(old)} times"
            patched += 1
    assert patched > len(tune.VARIANTS)
