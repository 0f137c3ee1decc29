"""Where routed experts run. The engine calls one interface; the backend decides where the math happens.

`LocalExperts` runs them in this process (one-process serving, benchmarks, tests). The distributed
backend (`grpc_experts.GrpcExperts`) implements the same interface over gRPC; its `submit` returns
before the shards answer, which lets the engine overlap two micro-batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moe_core.experts import expert_forward
from moe_core.forward import ExpertCall, ExpertHandle
from moe_core.weights import LayerExperts


class Done:
    """A handle whose result is already there."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value


class ExpertBackend(ABC):
    overlaps = False  # True when submit() returns while the experts are still computing
    # The phases ("prefill", "decode") whose rows this backend reuses by their exact input bytes (the
    # cache): the engine then runs their attention so that a row's bits do not depend on the rest of
    # the step. Left empty, the engine takes the faster batched kernels.
    invariant_phases: frozenset[str] = frozenset()

    @abstractmethod
    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k] float32, ids [T, k] int64 -> weighted sum of expert outputs [T, H]."""

    def submit(self, call: ExpertCall) -> ExpertHandle:
        """Start one layer's expert work; the handle's result() is forward()'s answer."""
        return Done(self.forward(call.layer, call.x, call.weights, call.ids))

    def __call__(self, call: ExpertCall) -> torch.Tensor:
        return self.submit(call).result()

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release connections or threads the backend holds."""


class WrappedBackend(ExpertBackend):
    """A backend in front of another (cache, metrics): it keeps the inner one's traits."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner
        self.overlaps = inner.overlaps
        self.invariant_phases = inner.invariant_phases

    def close(self) -> None:
        self.inner.close()


class LocalExperts(ExpertBackend):
    def __init__(self, experts: dict[int, LayerExperts]):
        self.experts = experts

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return expert_forward(self.experts[layer], x, ids, weights)
