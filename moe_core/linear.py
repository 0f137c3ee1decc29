"""Matmul weights prepared once for the fastest kernel of their device.

On CPU, oneDNN's prepacked layout runs the small-row GEMMs of decoding (8–32 rows per expert) 1.3–3×
faster than a plain `F.linear` (bench/RESULTS.md); elsewhere, and where the CPU lacks what oneDNN needs
for the dtype, the weight stays a plain tensor. `MOE_PACK_WEIGHTS=0` turns packing off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

PACK_HINT = 16  # rows oneDNN tunes the packed layout for (a decode step's rows per expert)


def packing_enabled(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and os.environ.get("MOE_PACK_WEIGHTS", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    """y = x @ W.T + b for a [out, in] weight."""

    __slots__ = ("bias", "packed", "shape", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool | None = None):
        self.shape = tuple(weight.shape)
        self.bias = bias
        self.packed = None
        self.weight: torch.Tensor | None = weight
        if packing_enabled(weight) if pack is None else pack:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_HINT)
                self.weight = None
            except RuntimeError:  # this CPU lacks what oneDNN needs for the dtype: keep the plain kernel
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def dense(self) -> torch.Tensor:
        """The weight as a plain tensor (for inspection and tests)."""
        return self.packed.to_dense() if self.packed is not None else self.weight

    @property
    def dtype(self) -> torch.dtype:
        return (self.packed if self.packed is not None else self.weight).dtype

    @property
    def device(self) -> torch.device:
        return (self.packed if self.packed is not None else self.weight).device
