"""A float32 GEMM for the small-row matmuls of decoding, with weights packed in 16-column panels
(kernels/panel_gemm.cpp, built by `moe_core.native`).

On AVX2 CPUs without AVX-512 oneDNN's float32 kernels read expert weights at 4-7 GB/s of the 14 a
core can stream at the 1-32 rows per expert of a decode step; this kernel runs the same GEMMs 1.2-2x
faster and stays ahead up to prefill sizes (bench/RESULTS.md, "Native kernels for AVX2 CPUs").
`MOE_PANEL_GEMM` (auto | 1 | 0), as for every native kernel.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from moe_core import native

SETTING = "MOE_PANEL_GEMM"
PANEL = 16  # output columns per panel: must match kPanel in the source


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def enabled_for(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in WEIGHT_DTYPES and native.wanted(SETTING)
            and library() is not None)


@functools.cache
def library() -> ctypes.CDLL | None:
    return native.load_gemm("panel_gemm", PANEL, ("panel_gemm", "panel_gemm_bf16"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 or bfloat16 -> [ceil(N / 16), K, 16] panels of that dtype, the last one zero-padded."""
    if weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"panel GEMM weights are float32 or bfloat16, not {weight.dtype}")
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def unpack(panels: torch.Tensor, n: int) -> torch.Tensor:
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n].contiguous()


def matmul(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 -> x @ W.T (+ bias) [M, n] float32, W being what `pack` got; bias contiguous float32 [n]."""
    if x.dtype != torch.float32 or x.shape[-1] != panels.shape[1]:
        raise ValueError(f"panel GEMM wants float32 rows of {panels.shape[1]}, got {x.dtype} {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        kernel = library().panel_gemm_bf16 if panels.dtype == torch.bfloat16 else library().panel_gemm
        kernel(x.data_ptr(), x.stride(0), m, x.shape[1], panels.data_ptr(),
               None if bias is None else bias.data_ptr(), n, y.data_ptr(), n)
    return y
