"""Matmul weights prepared once for the fastest kernel of their device.

On CPU, oneDNN's prepacked layout runs the small-row GEMMs of decoding (8–32 rows per expert) 1.3–3×
faster than a plain `F.linear` (bench/RESULTS.md), in float32 and, on CPUs with native bf16, in
bfloat16; elsewhere, and where the CPU lacks what oneDNN needs for the dtype, the weight stays a
plain tensor. `MOE_PACK_WEIGHTS=0` turns packing off.

oneDNN JIT-compiles and keeps a kernel for every distinct row count it sees (about 1 MiB each, not
bounded by its primitive-cache capacity), so a long-running service that sees every row count from 1
to a few thousand grows by gigabytes. Packed calls therefore run on a fixed set of row counts: up to
EXACT_ROWS as they come (decode steps, where padding would cost in proportion), larger inputs split
into ROW_CHUNKS pieces plus a remainder below EXACT_ROWS. Rows are independent in a GEMM, so the split
changes no result; it costs one extra call per piece (bench/RESULTS.md, "Bounded kernel set").
`MOE_SPLIT_ROWS=0` turns the split off (for side-by-side measurements).

On CPUs with AVX512-BF16, bfloat16 weights go to `moe_core.bf16_gemm` (the pair dot without AMX, AMX
tiles with it: faster than oneDNN from 1 row to prefill sizes on either, one kernel for all row counts, a
row's result independent of its neighbours). On CPUs with AVX2 but no AVX-512, float32 and bfloat16 weights go to
the panel GEMM instead
(`moe_core.panel_gemm`: faster than oneDNN there at every row count measured, one kernel for all row
counts, and a row's result never depends on its neighbours), so neither the bounded kernel set nor the
lone-row probe applies. It computes in float32; bfloat16 weights only halve the bytes read.

For some shapes oneDNN runs a single row through another kernel than two or more, whose result
differs in the last bits. The expert-output cache needs a row's output not to depend on how many
rows share its call, so such layers (found by a probe when packed) run a lone row as two.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moe_core import bf16_gemm, panel_gemm
from moe_core.dtypes import cpu_has_fast_bf16

PACK_HINT = 16  # rows oneDNN tunes the packed layout for (a decode step's rows per expert)
EXACT_ROWS = 64  # row counts up to this run as one call
ROW_CHUNKS = (256, 128, 64)  # larger inputs are cut into these, largest first
SPLIT_ROWS = os.environ.get("MOE_SPLIT_ROWS", "1") != "0"


def row_pieces(rows: int) -> list[int]:
    """The row counts a packed call over `rows` rows runs as: each is <= EXACT_ROWS or in ROW_CHUNKS."""
    pieces = []
    for chunk in ROW_CHUNKS:
        while rows > EXACT_ROWS and rows >= chunk:
            pieces.append(chunk)
            rows -= chunk
    if rows:
        pieces.append(rows)
    return pieces


def packing_enabled(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and _packable_dtype(weight.dtype)
            and os.environ.get("MOE_PACK_WEIGHTS", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packable_dtype(dtype: torch.dtype) -> bool:
    """float32 always; bfloat16 where the CPU has native bf16 (1.5-3.5x faster than packed float32 there)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and cpu_has_fast_bf16()
    return dtype == torch.float32


class Linear:
    """y = x @ W.T + b for a [out, in] weight."""

    __slots__ = ("bias", "packed", "pad_single", "pairs", "panels", "shape", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool | None = None):
        self.shape = tuple(weight.shape)
        self.bias = bias
        self.packed = None
        self.panels = None
        self.pairs = None
        self.weight: torch.Tensor | None = weight
        if pack is None and bf16_gemm.enabled_for(weight):
            self.pairs = bf16_gemm.pack(weight)
            self.bias = None if bias is None else bias.float().contiguous()
            self.weight = None
        elif pack is None and panel_gemm.enabled_for(weight):  # pack=True asks for oneDNN's layout
            self.panels = panel_gemm.pack(weight)
            self.bias = None if bias is None else bias.float().contiguous()
            self.weight = None
        elif packing_enabled(weight) if pack is None else pack:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_HINT)
                self.weight = None
            except RuntimeError:  # this CPU lacks what oneDNN needs for the dtype: keep the plain kernel
                self.packed = None
        self.pad_single = self.packed is not None and self._single_row_differs()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairs is not None:  # bfloat16 rows in and out, float32 accumulation
            y = bf16_gemm.matmul(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.pairs, self.shape[0], self.bias)
            return y.reshape(*x.shape[:-1], self.shape[0]).to(x.dtype)
        if self.panels is not None:  # float32 rows in and out (bfloat16 weights widen in the kernel)
            y = panel_gemm.matmul(x.reshape(-1, x.shape[-1]).float(), self.panels, self.shape[0], self.bias)
            return y.reshape(*x.shape[:-1], self.shape[0]).to(x.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= EXACT_ROWS or not SPLIT_ROWS:
            return self._rows(rows).reshape(*x.shape[:-1], self.shape[0])
        pieces = row_pieces(rows.shape[0])
        if len(pieces) == 1:  # a chunk size exactly: no concatenation (a copy of the whole output)
            return self._rows(rows).reshape(*x.shape[:-1], self.shape[0])
        outs, start = [], 0
        for piece in pieces:
            outs.append(self._rows(rows[start:start + piece]))
            start += piece
        return torch.cat(outs).reshape(*x.shape[:-1], self.shape[0])

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 1 and self.pad_single:
            return self._packed(rows.expand(2, -1).contiguous())[:1]
        return self._packed(rows)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _single_row_differs(self) -> bool:
        x = torch.randn(2, self.shape[1], generator=torch.Generator().manual_seed(0)).to(self.packed.dtype)
        return not torch.equal(self._packed(x[:1]), self._packed(x)[:1])

    def dense(self) -> torch.Tensor:
        """The weight as a plain tensor (for inspection and tests)."""
        if self.pairs is not None:
            return bf16_gemm.unpack(self.pairs, self.shape[0])
        if self.panels is not None:
            return panel_gemm.unpack(self.panels, self.shape[0])
        return self.packed.to_dense() if self.packed is not None else self.weight

    @property
    def dtype(self) -> torch.dtype:
        return self._stored.dtype

    @property
    def device(self) -> torch.device:
        return self._stored.device

    @property
    def _stored(self) -> torch.Tensor:
        return next(t for t in (self.pairs, self.panels, self.packed, self.weight) if t is not None)
