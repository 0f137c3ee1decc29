"""The router's combine of the shards' replies to one layer step (router_service/grpc_experts.py)."""

from __future__ import annotations

import pytest
import torch

from moe_core import codec
from moe_core.pb import expert_pb2
from router_service import grpc_experts
from router_service.grpc_experts import _Pending
from router_service.replica import Replica
from router_service.shard_map import Part, Shard, ShardMap
from tests.unit.test_placement import CFG

T, H = 12, 16


class _Backend:
    def __init__(self):
        self.accounted = []

    def _account(self, layer, parts, responses, seconds):
        self.accounted.append((layer, len(parts), len(responses)))


class _Flight:
    """A data-plane flight whose reply is already there; notes the running sum when it is read."""

    def __init__(self, output: torch.Tensor, sums: list, running: list):
        self.output, self.sums, self.running = output, sums, running

    def result(self) -> expert_pb2.ExpertResponse:
        self.sums.append(None if self.running[0] is None else self.running[0].clone())
        return expert_pb2.ExpertResponse(output=codec.encode(self.output))


def _run(monkeypatch, parts: list[Part], outputs: list[torch.Tensor], x: torch.Tensor):
    """-> the combined output, the running sum as each flight was read, and the backend it accounted to."""
    sums, running = [], [None]
    add = grpc_experts._Combine.add

    def watched(self, part, response):
        add(self, part, response)
        running[0] = self.out

    monkeypatch.setattr(grpc_experts._Combine, "add", watched)
    backend = _Backend()
    flights = [_Flight(out, sums, running) for out in outputs]
    return _Pending(backend, 1, x, parts, flights, None, 0.0).result(), sums, backend


def _shards() -> list[Shard]:
    return [Shard(name, [Replica(name, f"127.0.0.1:{port}")], {(1, e) for e in range(8)})
            for name, port in (("a", 1), ("b", 2), ("c", 3))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replies_are_summed_in_part_order_in_float32_and_each_before_the_next_is_read(monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dtype)
    a, b, c = _shards()
    rows = [torch.tensor([0, 1, 2, 5, 7, 9]), torch.tensor([1, 2, 3, 4, 9, 11]), torch.tensor([0, 2, 6, 8, 10, 11])]
    parts = [Part(s, r, torch.zeros(len(r), 2, dtype=torch.int32), torch.ones(len(r), 2))
             for s, r in zip((a, b, c), rows, strict=True)]
    outputs = [torch.randn(len(r), H, generator=g).to(dtype) for r in rows]
    out, sums, backend = _run(monkeypatch, parts, outputs, x)
    want = torch.zeros(T, H)
    for r, y in zip(rows, outputs, strict=True):  # row 2 is in all three parts: the order shows in its bits
        want.index_add_(0, r, y.float())
    assert out.dtype == dtype and torch.equal(out, want.to(dtype))
    first = torch.zeros(T, H).index_add_(0, rows[0], outputs[0].float())
    assert sums[0] is None and torch.equal(sums[1], first)  # the first reply was added before the second was read
    assert backend.accounted == [(1, 3, 3)]


def test_ffn_parts_add_up_and_one_whole_part_is_passed_through(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    a, b, _ = _shards()
    every = torch.arange(T)
    parts = [Part(s, every, torch.zeros(T, 2, dtype=torch.int32), torch.ones(T, 2)) for s in (a, b)]
    outputs = [torch.randn(T, H, generator=g).to(torch.bfloat16) for _ in parts]
    out, _, _ = _run(monkeypatch, parts, outputs, x)
    assert torch.equal(out, (outputs[0].float() + outputs[1].float()).to(torch.bfloat16))
    out, _, _ = _run(monkeypatch, parts[:1], outputs[:1], x)
    assert torch.equal(out, outputs[0])


def test_a_step_split_by_the_shard_map_combines_to_the_per_row_sum(monkeypatch):
    a, b, _ = _shards()
    a.pairs = {(1, e) for e in range(5)} | {(3, e) for e in range(8)}
    b.pairs = {(1, e) for e in range(3, 8)}  # experts 3 and 4 on both
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    parts = ShardMap(CFG, [a, b]).split(1, ids, torch.rand(T, 2, generator=g))
    x = torch.randn(T, H, generator=g)
    per_pair = torch.randn(T, 2, H, generator=g)  # what each (row, slot) pair's expert "returned"
    outputs = [(per_pair[p.rows] * (p.ids >= 0)[..., None]).sum(1) for p in parts]
    out, _, _ = _run(monkeypatch, parts, outputs, x)
    torch.testing.assert_close(out, per_pair.sum(1))
