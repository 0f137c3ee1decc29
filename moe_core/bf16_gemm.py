"""A bfloat16 GEMM on AVX512-BF16's pair dot product (kernels/bf16_gemm.cpp, built by `moe_core.native`),
for every matmul of a bfloat16 model on CPUs that have the instruction and no AMX, and a SwiGLU's gate and
up projections with the activation in the same pass.

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
    lib = native.load("bf16_gemm")
    if lib is None:
        return None
    if lib.bf16_gemm_panel_width() != PANEL:
        raise RuntimeError(f"{lib._name} packs {lib.bf16_gemm_panel_width()} columns per panel, this module {PANEL}")
    lib.bf16_gemm.restype = None
    lib.bf16_gemm.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_long]
    lib.bf16_gemm_swiglu.restype = None
    lib.bf16_gemm_swiglu.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_void_p, ctypes.c_long]
    return lib


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


def pack_gated(weight: torch.Tensor) -> torch.Tensor:
    """A SwiGLU's [2I, K] gate-then-up weight -> its gate and up panels interleaved (gate panel q, up panel q),
    each half padded to whole panels: the layout `swiglu` reads."""
    i = weight.shape[0] // 2
    if weight.shape[0] != 2 * i:
        raise ValueError(f"a gate/up weight has an even number of rows, not {weight.shape[0]}")
    gate, up = pack(weight[:i]), pack(weight[i:])
    return torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:]).contiguous()


def unpack_gated(panels: torch.Tensor, i: int) -> torch.Tensor:
    return torch.cat([unpack(panels[0::2], i), unpack(panels[1::2], i)])


def matmul(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bfloat16 -> x @ W.T (+ bias) [M, n] bfloat16, W being what `pack` got; bias contiguous
    float32 [n], added before the one rounding to bfloat16."""
    x, k = _rows(x, panels)
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    if x.shape[0]:
        library().bf16_gemm(x.data_ptr(), x.stride(0), x.shape[0], k, panels.data_ptr(),
                            None if bias is None else bias.data_ptr(), n, y.data_ptr(), n)
    return y


def swiglu(x: torch.Tensor, panels: torch.Tensor, i: int) -> torch.Tensor:
    """x [M, K] bfloat16 -> silu(x @ G.T) * (x @ U.T) [M, i] bfloat16 for what `pack_gated` got: the bits of
    `F.silu(gate) * up` over the bfloat16 tensors gate and up, without writing them."""
    x, k = _rows(x, panels)
    y = torch.empty(x.shape[0], i, dtype=torch.bfloat16)
    if x.shape[0]:
        library().bf16_gemm_swiglu(x.data_ptr(), x.stride(0), x.shape[0], k, panels.data_ptr(), i, y.data_ptr(), i)
    return y


def _rows(x: torch.Tensor, panels: torch.Tensor) -> tuple[torch.Tensor, int]:
    k = 2 * panels.shape[1]
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"bf16 GEMM wants bfloat16 rows of {k}, got {x.dtype} {tuple(x.shape)}")
    return (x if x.stride(1) == 1 else x.contiguous()), k
