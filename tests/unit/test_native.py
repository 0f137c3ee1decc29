"""Native kernels: built once per source, shared through a directory, on torch's OpenMP runtime, and
reported (never raised) where they cannot be built."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_core import bf16_gemm, native, panel_gemm
from moe_core.dtypes import cpu_flags
from moe_core.linear import Linear

KERNELS = list(native.KERNELS)
needs_avx2 = pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="the kernels need AVX2 and FMA")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel directory and no library loaded yet in this process."""
    monkeypatch.setenv("MOE_KERNEL_DIR", str(tmp_path))
    native.load.cache_clear()
    panel_gemm.library.cache_clear()
    bf16_gemm.library.cache_clear()
    yield tmp_path
    native.load.cache_clear()
    panel_gemm.library.cache_clear()
    bf16_gemm.library.cache_clear()


def test_the_default_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("MOE_X", raising=False)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert native.wanted("MOE_X")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert not native.wanted("MOE_X")  # torch's AVX-512 kernels keep the job
    assert native.wanted("MOE_X", beside_avx512=True)  # unless the kernel beats them there too
    monkeypatch.setenv("MOE_X", "1")
    assert native.wanted("MOE_X")
    monkeypatch.setenv("MOE_X", "0")
    assert not native.wanted("MOE_X")
    monkeypatch.setenv("MOE_X", "1")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse4_2"}))
    assert not native.wanted("MOE_X")  # forced on, but the CPU cannot run it


@needs_avx2
@pytest.mark.parametrize("name", KERNELS)
def test_builds_into_its_directory_once(fresh, name):
    first = native.build(name)
    assert first.parent == fresh and first.name.startswith(name) and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native.build(name) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in fresh.iterdir()] == [first.name]  # no temporary left behind
    assert native.load(name) is not None


@needs_avx2
def test_the_libraries_run_on_torchs_openmp_runtime():
    """Two libgomp copies would mean two thread teams fighting over the cores. In a fresh process: other
    packages of the test run (sentencepiece) bring copies of their own."""
    script = ("import torch\nfrom moe_core import native\n"
              f"assert all(native.load(n) is not None for n in {KERNELS!r})\n"
              "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    gomps = ast.literal_eval(out.strip().splitlines()[-1])
    assert len(gomps) == 1 and gomps[0].startswith(str(Path(torch.__file__).parent)), gomps


def test_without_a_compiler_it_says_so_and_linear_uses_onednn(monkeypatch, fresh, caplog):
    monkeypatch.setenv("MOE_PANEL_GEMM", "1")
    monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="moe_core.native"):
        layer = Linear(torch.randn(8, 8))
        monkeypatch.setenv("MOE_BF16_GEMM", "1")
        half = Linear(torch.randn(8, 8).bfloat16())
    assert layer.panels is None and layer(torch.ones(1, 8)).shape == (1, 8)
    assert half.pairs is None and half(torch.ones(1, 8).bfloat16()).shape == (1, 8)
    assert "no C++ compiler" in caplog.text and "panel_gemm" in caplog.text


def test_without_a_compiler_the_expert_cache_indexes_in_python(monkeypatch, fresh, caplog):
    from router_service import row_keys
    from router_service.cache import LocalCache

    monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
    row_keys.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="moe_core.native"):
            cache = LocalCache(1 << 20)
            x, ids, weights = torch.randn(4, 64), torch.tensor([[0, 1]] * 4), torch.rand(4, 2)
            keys, _ = cache.lookup_step(3, x, ids, weights, 0, 4)
            cache.put_rows(3, keys.digests, np.ones((4, 256), dtype=np.uint8))
            again, rows = cache.lookup_step(3, x, ids, weights, 0, 4)
        assert not cache.native and again.held == 4 and (rows == 1).all()
        assert "row_cache" in caplog.text and "no C++ compiler" in caplog.text
    finally:
        row_keys.library.cache_clear()


def test_a_broken_compile_is_reported_not_raised(monkeypatch, fresh, caplog):
    sources = fresh / "src"
    sources.mkdir()
    (sources / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", sources)
    with caplog.at_level(logging.WARNING, logger="moe_core.native"):
        assert native.load("broken") is None
    assert "broken.cpp" in caplog.text
    assert not list(fresh.glob("*.so*"))


@needs_avx2
def test_a_prebuilt_directory_serves_a_machine_without_a_compiler(monkeypatch, fresh):
    """What the CPU image does: built in the builder stage, loaded where no compiler is."""
    for name in KERNELS:
        native.build(name)
    native.load.cache_clear()
    monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
    for name in KERNELS:
        lib = native.load(name)
        assert lib is not None and lib._name.startswith(str(fresh))
