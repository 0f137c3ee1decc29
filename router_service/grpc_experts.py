"""The distributed expert backend: one message per shard per layer step, to every shard at once.

The engine thread calls `forward` (or `submit`, then `result`). A shard call goes to the live replica
with the fewest calls in flight. Where that replica offers a data plane (ShardInfo.data_port), the
engine thread writes the message on the replica's socket itself and reads the reply (data_link.py);
otherwise the call runs as a gRPC ForwardStream message on the router's asyncio loop, where the
channels live. Either way all shards are sent to before any reply is awaited. On UNAVAILABLE or
DEADLINE_EXCEEDED the replica is marked down and the call is retried once on another replica over
gRPC (`discovery.monitor` probes the replica back).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from moe_core import codec, frames
from moe_core.config import MoeConfig
from moe_core.errors import UnavailableError
from moe_core.forward import ExpertCall
from moe_core.pb import expert_pb2
from moe_core.rpc import StatusError, Tls
from moe_core.threads import one_thread
from router_service.data_link import DataLink, data_address
from router_service.expert_backend import ExpertBackend
from router_service.metrics import DispatchMetrics
from router_service.replica import Replica, ReplicaError
from router_service.shard_map import Part, Shard, ShardMap

log = logging.getLogger(__name__)


class RowsSent:
    """Rows sent to each shard, [layers, experts] per shard.

    Steps are counted a batch at a time: a bincount per part and step cost ≈ 0.1 ms of the router's
    layer step at concurrency 1, where the whole hop costs ≈ 1 ms."""

    BATCH = 256  # parts kept before they are counted

    def __init__(self, shard_ids: list[str], layers: int, experts: int):
        self.experts = experts
        self._counts = {s: torch.zeros(layers, experts, dtype=torch.int64) for s in shard_ids}
        self._pending: list[tuple[str, int, torch.Tensor]] = []
        self._lock = threading.Lock()

    def add(self, shard_id: str, layer: int, ids: torch.Tensor) -> None:
        with self._lock:
            self._pending.append((shard_id, layer, ids))
            if len(self._pending) >= self.BATCH:
                self._count()

    def __getitem__(self, shard_id: str) -> torch.Tensor:
        with self._lock:
            self._count()
            return self._counts[shard_id].clone()

    def _count(self) -> None:
        for shard_id, counts in self._counts.items():
            mine = [(layer, ids.reshape(-1)) for s, layer, ids in self._pending if s == shard_id]
            if not mine:
                continue
            ids = torch.cat([flat for _, flat in mine]).long()
            offsets = torch.repeat_interleave(torch.tensor([layer * self.experts for layer, _ in mine]),
                                              torch.tensor([flat.numel() for _, flat in mine]))
            used = ids >= 0
            counts += torch.bincount((ids + offsets)[used], minlength=counts.numel()).view_as(counts)
        self._pending.clear()


@dataclass
class DispatchStats:
    """Where layer steps spend their time, and what each shard was sent."""

    calls: int = 0  # layer steps dispatched
    seconds: float = 0.0  # wall time of those steps, from split to combined output
    shard_compute_seconds: float = 0.0  # the slowest shard's own compute, summed over steps
    retries: int = 0
    rows_sent: RowsSent | None = None


class _Flight:
    """One shard's message on a replica's data plane, sent and not yet answered."""

    __slots__ = ("backend", "fallback", "link", "replica", "request", "rows", "shard", "started")

    def __init__(self, backend: GrpcExperts, shard: Shard, replica: Replica, request: frames.Outgoing, rows: int):
        self.backend, self.shard, self.replica, self.request, self.rows = backend, shard, replica, request, rows
        self.link = backend._link(replica)
        self.started = time.perf_counter()
        self.fallback = False
        replica.link_outstanding += 1
        try:
            self.link.send(request)
        except ReplicaError as exc:
            if self.link.unreachable:  # e.g. behind NAT: this replica's steps go over gRPC from now on
                log.warning("data plane of %s unreachable (%s): using gRPC for it", replica.address, exc)
                replica.data_port = 0
                self.fallback = True
            self.link = None  # failed already; result() sends the step elsewhere

    def result(self) -> expert_pb2.ExpertResponse:
        backend, replica = self.backend, self.replica
        if self.fallback:
            replica.link_outstanding -= 1
            return asyncio.run_coroutine_threadsafe(backend._call(self.shard, self.request.whole(), self.rows),
                                                    backend.loop).result()
        try:
            if self.link is None:
                raise ReplicaError(grpc.StatusCode.UNAVAILABLE, f"data plane of {replica.address} refused the step")
            response = self.link.receive(self.request.message.step_id)
        except ReplicaError as exc:
            backend._error(self.shard, replica, exc.code)
            replica.mark_down(str(exc))
            backend.stats.retries += 1
            log.warning("expert shard %s: %s, retrying the step elsewhere", self.shard.shard_id, exc)
            retry = backend._call(self.shard, self.request.whole(), self.rows, tried={replica})
            return asyncio.run_coroutine_threadsafe(retry, backend.loop).result()
        finally:
            replica.link_outstanding -= 1
        try:
            response = replica.checked(response)
        except StatusError as exc:
            backend._error(self.shard, replica, exc.code)
            raise
        backend._observe(self.shard, replica, self.rows, time.perf_counter() - self.started)
        return response


class _Pending:
    """A layer step in flight; result() waits for every shard and adds their partial sums."""

    __slots__ = ("backend", "flights", "future", "layer", "parts", "started", "x")

    def __init__(self, backend: GrpcExperts, layer: int, x: torch.Tensor, parts: list[Part], flights: list,
                 future, started: float):
        self.backend, self.layer, self.x, self.parts = backend, layer, x, parts
        self.flights, self.future, self.started = flights, future, started

    def result(self) -> torch.Tensor:
        # Each reply is added as it arrives, in part order, while the shards after it still compute: only
        # the last shard's share of the combine is left once every shard has answered. Every flight is read
        # even when another part failed, so no reply is left behind on a link.
        responses, failure = [], None
        try:
            by_grpc = iter(self.future.result() if self.future else ())
        except Exception as exc:  # re-raised below, after the data plane's replies
            by_grpc, failure = iter(()), exc
        with one_thread():  # the other shards' processes may still hold the cores (moe_core/threads.py)
            combine = _Combine(self.x, self.parts)
            for part, flight in zip(self.parts, self.flights, strict=True):
                try:
                    response = next(by_grpc, None) if flight is None else flight.result()
                except Exception as exc:  # re-raised below, after the other shards' replies
                    failure = failure or exc
                    continue
                if failure is None:
                    combine.add(part, response)
                responses.append(response)
            if failure is not None:
                raise failure
            out = combine.finish()
        self.backend._account(self.layer, self.parts, responses, time.perf_counter() - self.started)
        return out


class _Combine:
    """The shards' partial outputs summed into the layer's [T, H] output, one reply at a time, in part order.

    The sum runs in float32 and in part order whenever the replies arrive, so the result does not depend
    on which shard answered first."""

    __slots__ = ("ffn", "out", "whole", "x")

    def __init__(self, x: torch.Tensor, parts: list[Part]):
        self.x = x
        self.whole = len(parts) == 1 and len(parts[0].rows) == x.shape[0]  # one shard had every row, in order
        self.ffn = all(len(part.rows) == x.shape[0] for part in parts)  # FFN parts, each a sum over every row
        # made while the shards compute, so that no reply waits for it
        self.out = None if self.whole or self.ffn else torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    def add(self, part: Part, response: expert_pb2.ExpertResponse) -> None:
        x = self.x
        y = codec.decode(response.output, "output").to(x.device)
        if self.whole:
            self.out = y.to(x.dtype)
        elif self.ffn and self.out is not None:
            self.out += y
        elif self.ffn:
            self.out = y.to(torch.float32, copy=True)
        else:
            self.out.index_add_(0, part.rows.to(x.device), y.float())

    def finish(self) -> torch.Tensor:
        if self.out is None:  # no part: a step without rows
            return torch.zeros_like(self.x)
        return self.out if self.whole else self.out.to(self.x.dtype)


class GrpcExperts(ExpertBackend):
    overlaps = True

    def __init__(self, cfg: MoeConfig, shard_map: ShardMap, revision: str, loop: asyncio.AbstractEventLoop,
                 rpc_timeout_s: float = 30.0, metrics: DispatchMetrics | None = None, data_plane: bool = True,
                 tls: Tls | None = None):
        self.cfg, self.map, self.revision, self.loop = cfg, shard_map, revision, loop
        self.timeout, self.metrics, self.data_plane, self.tls = rpc_timeout_s, metrics, data_plane, tls
        self.stats = DispatchStats(rows_sent=RowsSent([s.shard_id for s in shard_map.shards], cfg.num_hidden_layers,
                                                      cfg.num_experts))
        self._steps = itertools.count()
        self._lock = threading.Lock()

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.submit(ExpertCall(layer, x, weights, ids)).result()

    def submit(self, call: ExpertCall) -> _Pending:
        if _running_loop() is self.loop:
            raise RuntimeError("GrpcExperts must be called off the event loop's thread (it blocks on it)")
        started = time.perf_counter()
        flights, by_grpc = [], []
        with one_thread():  # the shards sent to first compute meanwhile, on the other cores (moe_core/threads.py)
            parts = self.map.split(call.layer, call.ids, call.weights)
            for part in parts:  # a data-plane message goes out before the next one is built
                request = self._request(call.layer, call.x, part, call.request_ids)
                replica = part.shard.pick(exclude=set()) if self.data_plane else None
                if replica is not None and replica.data_port:
                    flights.append(_Flight(self, part.shard, replica, request, len(part.rows)))
                else:
                    flights.append(None)
                    by_grpc.append((part, request.whole()))
        future = None
        if by_grpc:
            future = asyncio.run_coroutine_threadsafe(self._gather(*zip(*by_grpc, strict=True)), self.loop)
        return _Pending(self, call.layer, call.x, parts, flights, future, started)

    def _link(self, replica: Replica) -> DataLink:
        """The replica's data link, new when it has none, its last one failed, or its port changed (restart)."""
        link = replica.link
        if link is None or link.broken or link.port != replica.data_port:
            if link is not None:
                link.close()
            host, port = data_address(replica.address, replica.data_port)
            link = replica.link = DataLink(host, port, self.timeout, self.tls)
        return link

    def _request(self, layer: int, x: torch.Tensor, part: Part, request_ids: list[str] = ()) -> frames.Outgoing:
        """The shard's message, its hidden rows kept apart: written from the gathered tensor itself."""
        every_row = len(part.rows) == x.shape[0]  # rows are ascending and distinct: all of them, in order
        hidden, raw = codec.encode_apart(x if every_row else x[part.rows.to(x.device)])
        request = expert_pb2.ExpertRequest(model_revision=self.revision, layer=layer, hidden=hidden,
                                           expert_ids=codec.encode(part.ids), expert_weights=codec.encode(part.weights),
                                           step_id=next(self._steps), request_ids=request_ids)
        return frames.Outgoing(request, "hidden", raw)

    def _account(self, layer: int, parts: list[Part], responses: list, seconds: float) -> None:
        with self._lock:
            self.stats.calls += 1
            self.stats.seconds += seconds
            self.stats.shard_compute_seconds += max((r.compute_seconds for r in responses), default=0.0)
        for part in parts:
            self.stats.rows_sent.add(part.shard.shard_id, layer, part.ids)
        if self.metrics:
            self.metrics.dispatch.observe(seconds)
            for part in parts:
                self.metrics.shard_child(part.shard.shard_id).inc(len(part.rows))

    async def _gather(self, parts: list[Part], requests: list[expert_pb2.ExpertRequest]
                      ) -> list[expert_pb2.ExpertResponse]:
        calls = (self._call(p.shard, r, len(p.rows)) for p, r in zip(parts, requests, strict=True))
        return await asyncio.gather(*calls)

    async def _call(self, shard: Shard, request: expert_pb2.ExpertRequest, rows: int,
                    tried: set[Replica] | None = None) -> expert_pb2.ExpertResponse:
        """Over gRPC: the first choice, then one retry on another replica (`tried`: replicas that failed it)."""
        tried = set(tried or ())
        last = "no replica is live"
        for _ in range(2 - len(tried)):
            replica = shard.pick(exclude=tried)
            if replica is None:
                break
            tried.add(replica)
            started = time.perf_counter()
            try:
                response = await replica.forward(request, self.timeout)
            except ReplicaError as exc:
                self._error(shard, replica, exc.code)
                if not exc.retryable:
                    raise
                replica.mark_down(str(exc))
                last = f"{replica.address}: {exc}"
                self.stats.retries += 1
                continue
            except StatusError as exc:
                self._error(shard, replica, exc.code)
                raise
            self._observe(shard, replica, rows, time.perf_counter() - started)
            return response
        log.warning("expert shard %s has no live replica (%s)", shard.shard_id, last)
        raise UnavailableError(f"expert shard {shard.shard_id} has no live replica; try again shortly")

    def _observe(self, shard: Shard, replica: Replica, rows: int, seconds: float) -> None:
        if self.metrics:
            duration, tokens = self.metrics.replica_children(shard.shard_id, replica.address)
            duration.observe(seconds)
            tokens.inc(rows)

    def _error(self, shard: Shard, replica: Replica, code: grpc.StatusCode) -> None:
        if self.metrics:
            self.metrics.rpc_errors.labels(shard.shard_id, replica.address, code.name).inc()

    async def aclose(self) -> None:
        for shard in self.map.shards:
            for replica in shard.replicas:
                if replica.link is not None:
                    replica.link.close()
        await asyncio.gather(*(r.close() for s in self.map.shards for r in s.replicas))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
