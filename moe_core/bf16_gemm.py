"""A bfloat16 GEMM on AVX512-BF16's pair dot product (kernels/bf16_gemm.cpp, built by `moe_core.native`),
for every matmul of a bfloat16 model on CPUs that have the instruction and no AMX.

oneDNN's packed bfloat16 kernels read a decode step's weights at 12-25 GB/s on such a CPU (AMD Zen 4),
where the memory streams 34; this kernel reads them at 25-40 GB/s from 1 to 8 rows, and matches or beats
oneDNN up to prefill sizes (bench/RESULTS.md, "A bfloat16 GEMM for AVX512-BF16"). One kernel serves every
row count, and a row's result never depends on its neighbours or the thread count, so neither oneDNN's
bounded kernel set nor its lone-row probe applies.

`MOE_BF16_GEMM` (auto | 1 | 0): on `auto` it runs on CPUs with AVX512-BF16 but without AMX, whose tiles
oneDNN uses for bfloat16 and which were not measured against it; `1` forces it on any CPU with AVX512-BF16.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from moe_core import native
from moe_core.dtypes import cpu_flags

SETTING = "MOE_BF16_GEMM"
PANEL = 16  # output columns per panel: must match kPanel in the source
NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})


def wanted() -> bool:
    value = os.environ.get(SETTING, "auto")
    if value == "0" or not cpu_flags() >= NEEDS:
        return False
    return value == "1" or "amx_bf16" not in cpu_flags()


def enabled_for(weight: torch.Tensor) -> bool:
    """bfloat16 CPU weights with an even number of inputs (the kernel takes k in pairs), where wanted."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[1] % 2 == 0 and wanted() and library() is not None)


@functools.cache
def library() -> ctypes.CDLL | None:
    return native.load_gemm("bf16_gemm", PANEL, ("bf16_gemm",))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bfloat16, K even -> [ceil(N / 16), K / 2, 16, 2] panels, the last one zero-padded."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or k % 2:
        raise ValueError(f"bf16 GEMM weights are bfloat16 with an even number of columns, not {weight.dtype} {k}")
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.bfloat16)
    padded[:n] = weight
    return padded.view(panels, PANEL, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(panels: torch.Tensor, n: int) -> torch.Tensor:
    return panels.permute(0, 2, 1, 3).reshape(panels.shape[0] * PANEL, -1)[:n].contiguous()


def matmul(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bfloat16 -> x @ W.T (+ bias) [M, n] bfloat16, W being what `pack` got; bias contiguous
    float32 [n], added before the one rounding to bfloat16."""
    k = 2 * panels.shape[1]
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"bf16 GEMM wants bfloat16 rows of {k}, got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    if m:
        library().bf16_gemm(x.data_ptr(), x.stride(0), m, k, panels.data_ptr(),
                            None if bias is None else bias.data_ptr(), n, y.data_ptr(), n)
    return y
