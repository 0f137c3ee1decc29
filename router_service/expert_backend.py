"""Where routed experts run. The engine calls one interface; the backend decides where the math happens.

`LocalExperts` runs them in this process (one-process serving, benchmarks, tests). The distributed
backend implements the same interface over gRPC to expert services.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moe_core.experts import expert_forward
from moe_core.weights import LayerExperts


class ExpertBackend(ABC):
    @abstractmethod
    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k] float32, ids [T, k] int64 -> weighted sum of expert outputs [T, H]."""

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.forward(layer, x, weights, ids)

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release connections or threads the backend holds."""


class LocalExperts(ExpertBackend):
    def __init__(self, experts: dict[int, LayerExperts]):
        self.experts = experts

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return expert_forward(self.experts[layer], x, ids, weights)
