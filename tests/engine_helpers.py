"""Driving an Engine step by step in tests, and running asyncio code from a test thread."""

from __future__ import annotations

import asyncio
import threading

import torch

from router_service.engine.engine import Engine
from router_service.engine.params import SamplingParams
from router_service.expert_backend import ExpertBackend, LocalExperts, WrappedBackend


def drain(engine: Engine, joins: dict[int, list[tuple[list[int], SamplingParams]]] | None = None):
    """Step until idle; `joins[step]` lists requests added just before that step.

    -> {request id: outputs}, in the order the requests joined.
    """
    results: dict[str, list] = {}
    step = 0
    joins = joins or {}
    while engine.has_unfinished() or any(s >= step for s in joins):
        for prompt, params in joins.get(step, []):
            results[engine.add_request(prompt, params)] = []
        for out in engine.step():
            results[out.request_id].append(out)
        step += 1
    return results


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def logprobs(outs) -> list[float]:
    return [lp.logprob for o in outs for lp in o.logprobs or []]


def random_prompts(n: int, vocab: int, seed: int = 0, low: int = 2, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


class CountingExperts(WrappedBackend):
    """Wraps a backend and counts the router's gate decisions: rows per (layer, expert)."""

    def __init__(self, inner: ExpertBackend, layers: int, experts: int):
        super().__init__(inner)
        self.decisions = torch.zeros(layers, experts, dtype=torch.int64)

    def forward(self, layer, x, weights, ids):
        self.decisions[layer] += torch.bincount(ids.reshape(-1), minlength=self.decisions.shape[1])
        return self.inner.forward(layer, x, weights, ids)

    def submit(self, call):
        self.decisions[call.layer] += torch.bincount(call.ids.reshape(-1), minlength=self.decisions.shape[1])
        return self.inner.submit(call)


class LoopThread:
    """An asyncio loop on a background thread, as the router runs one beside its engine thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class DeferredExperts(LocalExperts):
    """Answers each submit only when its result is asked for, as a remote backend does."""

    overlaps = True

    def __init__(self, inner: LocalExperts):
        super().__init__(inner.experts)
        self.submitted = 0

    def submit(self, call):
        self.submitted += 1
        outer = self

        class Later:
            def result(self):
                return outer.forward(call.layer, call.x, call.weights, call.ids)

        return Later()
