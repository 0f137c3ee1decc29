"""C++ kernels from `moe_core/kernels`, compiled on first use with the machine's compiler, loaded with ctypes.

Each source becomes one shared library in `MOE_KERNEL_DIR` (default `~/.cache/moe-serve/kernels`),
named by a hash of the source, its headers and the flags, compiled with `CXX` (default `c++`) in a few
seconds and reused by every later process; a directory filled at image build time serves machines
without a compiler (deploy/docker/Dockerfile). A process that cannot build or load a kernel says so
once in the log, and its callers use torch's own kernels (or, for the expert cache's index, Python).

The kernels target AVX2 with FMA. The panel GEMM is the default on CPUs with AVX2 but no AVX-512, where
it was measured faster than oneDNN (bench/RESULTS.md, "Native kernels for AVX2 CPUs"); with AVX-512
oneDNN's kernels win from a few rows up. The paged decode attention is the default on every CPU with
AVX2 and FMA: it reads the cache in place where torch gathers a copy first, 1.45x faster on an AVX2 CPU
and 2x on an AVX-512 one with AMX ("Paged decode attention on amx-2core"). Each has a setting: `1` forces
it on any CPU with AVX2 and FMA, `0` turns it off. The libraries link OpenMP and
bind, at load, to the libgomp.so.1 torch brought in, so they run on torch's thread team and
`torch.set_num_threads` on the calling thread sets theirs.

`row_cache` is plain C++ for any CPU, with no OpenMP: the expert-output cache's row digests (xxHash's
xxh3-128, vendored as kernels/xxhash.h) and its local tier's LRU index (router_service/row_keys.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from moe_core.dtypes import cpu_flags

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("kernels")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# Called only where the CPU has them (moe_core.bf16_gemm checks).
EXTRA_FLAGS = {"bf16_gemm": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile",
                              "-mamx-bf16", "-ffp-contract=off")}
# Plain C++ for any x86-64 or other CPU, no OpenMP: the expert cache's local tier (router_service/cache.py).
PORTABLE_FLAGS = {"row_cache": ("-O3", "-shared", "-fPIC", "-std=c++17")}
HEADERS = {"row_cache": ("xxhash.h",)}  # vendored beside the sources (xxHash, BSD 2-clause: xxhash-LICENSE)
KERNELS = ("panel_gemm", "paged_attention", "bf16_gemm", "row_cache")


def wanted(setting: str, beside_avx512: bool = False) -> bool:
    """Whether a kernel with the environment setting `setting` (auto | 1 | 0) runs on this CPU; on
    `auto`, CPUs with AVX-512 keep torch's kernels unless the kernel is faster `beside_avx512` too."""
    value = os.environ.get(setting, "auto")
    if value == "0" or not {"avx2", "fma"} <= cpu_flags():
        return False
    return value == "1" or beside_avx512 or "avx512f" not in cpu_flags()


def kernel_dir() -> Path:
    return Path(os.environ.get("MOE_KERNEL_DIR") or Path.home() / ".cache" / "moe-serve" / "kernels")


def build(name: str) -> Path:
    """The library of kernels/`name`.cpp with these flags: found in `kernel_dir()`, or compiled there now."""
    source = SOURCES / f"{name}.cpp"
    flags = PORTABLE_FLAGS.get(name) or FLAGS + EXTRA_FLAGS.get(name, ())
    text = source.read_bytes() + b"".join((SOURCES / header).read_bytes() for header in HEADERS.get(name, ()))
    key = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    target = kernel_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise FileNotFoundError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together each build, and none loads a half-written file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The loaded library of kernels/`name`.cpp, or None (logged once) where it cannot be built or loaded."""
    try:
        return ctypes.CDLL(str(build(name)))
    except (OSError, subprocess.CalledProcessError) as e:  # FileNotFoundError is an OSError
        detail = getattr(e, "stderr", None) or e
        log.warning("native kernel %s unavailable, torch's kernels run instead: %s", name, detail)
        return None


# y = x . W^T (+ bias) over panel-packed weights: x, ldx, M, K, packed W, bias or null, N, y, ldy.
GEMM_ARGTYPES = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                 ctypes.c_int, ctypes.c_void_p, ctypes.c_long]


def load_gemm(name: str, panel: int, entries: tuple[str, ...]) -> ctypes.CDLL | None:
    """A panel GEMM library (`load`), its `<name>_panel_width()` checked against the caller's packing and
    its GEMM entry points typed; None where it cannot be built or loaded."""
    lib = load(name)
    if lib is None:
        return None
    width = getattr(lib, f"{name}_panel_width")()
    if width != panel:
        raise RuntimeError(f"{lib._name} packs {width} columns per panel, its caller {panel}")
    for entry in entries:
        fn = getattr(lib, entry)
        fn.restype = None
        fn.argtypes = GEMM_ARGTYPES
    return lib
