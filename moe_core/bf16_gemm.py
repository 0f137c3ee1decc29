"""A bfloat16 GEMM on AVX512-BF16's pair dot product, or on AMX tiles where the CPU has them
(kernels/bf16_gemm.cpp, built by `moe_core.native`), for every matmul of a bfloat16 model on CPUs that have
the instructions.

oneDNN's packed bfloat16 kernels read a decode step's weights at 12-25 GB/s on such a CPU (AMD Zen 4),
where the memory streams 34; this kernel reads them at 25-40 GB/s from 1 to 8 rows, and matches or beats
oneDNN up to prefill sizes (bench/RESULTS.md, "A bfloat16 GEMM for AVX512-BF16"). One kernel serves every
row count, and a row's result never depends on its neighbours or the thread count, so neither oneDNN's
bounded kernel set nor its lone-row probe applies.

On CPUs with AMX (Intel Sapphire Rapids and later) the same packed panels feed AMX tiles: 1.3-1.6x
oneDNN's AMX kernels from 1 to 64 rows, where a decode step reads weights at 10-12 GB/s per core against
oneDNN's 8-9, and 0.9-1.4x at 256-1,024 rows (bench/RESULTS.md, "AMX tiles for the bfloat16 GEMM"). A
process uses one of the two paths for all its GEMMs: their bits differ.

`MOE_BF16_GEMM` (auto | 1 | 0): on `auto` it runs on CPUs with AVX512-BF16, on AMX CPUs where the OS grants
the tile state (Linux 5.16+); `1` forces it on any CPU with AVX512-BF16; `0` leaves every matmul to oneDNN.
`MOE_BF16_AMX=0` keeps an AMX CPU on the pair dot.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from moe_core import native
from moe_core.dtypes import cpu_flags

SETTING = "MOE_BF16_GEMM"
AMX_SETTING = "MOE_BF16_AMX"
PANEL = 16  # output columns per panel: must match kPanel in the source
NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})


def wanted() -> bool:
    value = os.environ.get(SETTING, "auto")
    if value == "0" or not cpu_flags() >= NEEDS:
        return False
    return value == "1" or "amx_bf16" not in cpu_flags() or amx()


def enabled_for(weight: torch.Tensor) -> bool:
    """bfloat16 CPU weights with an even number of inputs (the kernel takes k in pairs), where wanted."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[1] % 2 == 0 and wanted() and library() is not None)


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.load_gemm("bf16_gemm", PANEL, ("bf16_gemm",))
    if lib is not None:
        lib.bf16_moe.restype = ctypes.c_int
        lib.bf16_moe.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.bf16_rms_norm.restype = None
        lib.bf16_rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_float, ctypes.c_void_p]
        lib.bf16_gemm_set_amx.restype = ctypes.c_int
        lib.bf16_gemm_set_amx.argtypes = [ctypes.c_int]
        # chosen once, before any GEMM: the two paths' bits differ, and the cache wants one per process
        lib.bf16_gemm_set_amx(int("amx_bf16" in cpu_flags() and os.environ.get(AMX_SETTING, "1") != "0"))
    return lib


def amx() -> bool:
    """Whether this process's bfloat16 GEMMs run on AMX tiles."""
    lib = library() if "amx_bf16" in cpu_flags() else None
    return lib is not None and bool(lib.bf16_gemm_set_amx(-1))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bfloat16, K even -> [ceil(N / 16), K / 2, 16, 2] panels, the last one zero-padded."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or k % 2:
        raise ValueError(f"bf16 GEMM weights are bfloat16 with an even number of columns, not {weight.dtype} {k}")
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.bfloat16)
    padded[:n] = weight
    return padded.view(panels, PANEL, k // 2, 2).permute(0, 2, 1, 3).contiguous()


@functools.cache
def norm_wanted() -> bool:
    """Whether bfloat16 RMSNorms run in one native pass (`rms_norm`): where this GEMM runs (read once)."""
    return wanted() and library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`moe_core.model.rms_norm` of bfloat16 rows [..., H] (last dim contiguous) with a bfloat16 weight [H],
    in one pass: the same roundings, the sum of squares in another order (bench/RESULTS.md, "AMX tiles for
    the bfloat16 GEMM")."""
    h = x.shape[-1]
    rows = x.reshape(-1, h) if x.dim() != 2 else x
    if rows.stride(1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < h):
        rows = rows.contiguous()
    weight = weight.contiguous()
    y = torch.empty(rows.shape[0], h, dtype=torch.bfloat16, device=x.device)
    if rows.shape[0]:
        library().bf16_rms_norm(rows.data_ptr(), rows.stride(0), rows.shape[0], h, weight.data_ptr(), eps,
                                y.data_ptr())
    return y.view(x.shape)


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


class LayerKernel:
    """One layer's routed experts in one native call (`bf16_moe`): grouping, each expert's SwiGLU FFN and
    the gate-weighted sum, the same bits as `moe_core.experts`' torch ops, without their ≈ 40 µs of
    Python and dispatch per expert (bench/RESULTS.md, "One call per layer's experts")."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor], local_of: torch.Tensor,
                 hidden: int, inter: int):
        self.hidden, self.inter, self.experts = hidden, inter, len(gate_up)
        self._panels = [*gate_up, *down]  # the packed weights the pointers below point into
        self._gate_up = (ctypes.c_void_p * len(gate_up))(*(p.data_ptr() for p in gate_up))
        self._down = (ctypes.c_void_p * len(down))(*(p.data_ptr() for p in down))
        self._local_of = local_of.to(torch.int64).contiguous()

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int]] | None:
        """x [T, H] bfloat16, ids [T, k] (global ids, -1 = none), weights [T, k] -> (out [T, H] bfloat16,
        pairs per local expert); None when a row names an expert not held here (nothing computed)."""
        if x.stride(1) != 1:
            x = x.contiguous()
        ids = ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        out = torch.empty(x.shape[0], self.hidden, dtype=torch.bfloat16)
        counts = torch.empty(self.experts, dtype=torch.int64)
        status = library().bf16_moe(x.data_ptr(), x.stride(0), x.shape[0], self.hidden, self.inter, ids.shape[1],
                                    ids.data_ptr(), weights.data_ptr(), self._local_of.data_ptr(),
                                    self._local_of.numel(), self.experts, self._gate_up, self._down,
                                    out.data_ptr(), counts.data_ptr())
        return None if status else (out, counts.tolist())


def layer_kernel(gate_up: list, down: list, local_of: torch.Tensor) -> LayerKernel | None:
    """The native layer call for experts whose every weight runs on this kernel without a bias (the
    `Linear`s of `moe_core.weights`), else None."""
    linears = [*gate_up, *down]
    if not linears or any(lin.pairs is None or lin.bias is not None for lin in linears):
        return None
    (two_inter, hidden), inter = gate_up[0].shape, down[0].shape[1]
    if (any(lin.shape != (two_inter, hidden) for lin in gate_up) or two_inter != 2 * inter
            or any(lin.shape != (hidden, inter) for lin in down)):
        return None
    return LayerKernel([lin.pairs for lin in gate_up], [lin.pairs for lin in down], local_of, hidden, inter)
