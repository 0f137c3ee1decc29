"""A float32 GEMM for CPUs with AVX2 but no AVX-512, built from `kernels/panel_gemm.cpp` on first use.

On such CPUs oneDNN's float32 kernels read expert weights at 4-7 GB/s of the 14 a core can stream, at
the 1-32 rows per expert of a decode step; this kernel, with the weight packed in 16-column panels,
runs the same GEMMs 1.2-2x faster and stays ahead up to prefill sizes (bench/RESULTS.md, "A panel GEMM
for AVX2 CPUs"). Where AVX-512 is present oneDNN keeps the job (its AVX-512 kernels were not beaten
there by anything measured), so the default is on only for AVX2-only CPUs; `MOE_PANEL_GEMM=1` forces
it on any CPU with AVX2 and FMA, `MOE_PANEL_GEMM=0` off.

The library is compiled once per source into `MOE_KERNEL_DIR` (default `~/.cache/moe-serve/kernels`)
with the machine's C++ compiler (`CXX`, default `c++`, about a second); a process that cannot build or
load it says so once in the log and uses oneDNN.
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

import torch

from moe_core.dtypes import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "panel_gemm.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
PANEL = 16  # output columns per panel: must match kPanel in the source


def wanted() -> bool:
    """Whether float32 CPU matmuls should use this kernel (setting, then the CPU)."""
    setting = os.environ.get("MOE_PANEL_GEMM", "auto")
    if setting == "0" or not {"avx2", "fma"} <= cpu_flags():
        return False
    return setting == "1" or "avx512f" not in cpu_flags()


def enabled_for(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and wanted() and library() is not None


def kernel_dir() -> Path:
    return Path(os.environ.get("MOE_KERNEL_DIR") or Path.home() / ".cache" / "moe-serve" / "kernels")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (logged once) where it cannot be built or loaded here."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("panel GEMM unavailable, float32 matmuls use oneDNN: %s", detail)
        return None
    if lib.panel_gemm_panel_width() != PANEL:
        log.warning("panel GEMM library at %s has another panel width; using oneDNN", lib._name)
        return None
    fn = lib.panel_gemm
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_long]
    return lib


def build() -> Path:
    """The library for this source and these flags: found in `kernel_dir()`, or compiled there now.

    A directory filled at image build time serves machines without a compiler (deploy/docker/Dockerfile)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = kernel_dir() / f"panel_gemm-{key}.so"
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
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [ceil(N / 16), K, 16] panels, the last one zero-padded."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.float32)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def unpack(panels: torch.Tensor, n: int) -> torch.Tensor:
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n].contiguous()


def matmul(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 -> x @ W.T (+ bias) [M, n], W being what `pack` got; bias contiguous float32 [n]."""
    if x.dtype != torch.float32 or x.shape[-1] != panels.shape[1]:
        raise ValueError(f"panel GEMM wants float32 rows of {panels.shape[1]}, got {x.dtype} {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        library().panel_gemm(x.data_ptr(), x.stride(0), m, x.shape[1], panels.data_ptr(),
                             None if bias is None else bias.data_ptr(), n, y.data_ptr(), n)
    return y
