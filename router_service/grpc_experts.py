"""The distributed expert backend: one message per shard per layer step, to every shard at once.

The engine thread calls `forward`; the calls themselves run on the router's asyncio loop (where the
gRPC channels live), all shards concurrently. A shard call goes to the live replica with the fewest
calls in flight; on UNAVAILABLE or DEADLINE_EXCEEDED the replica is marked down and the call is
retried once on another replica. A background task health-checks replicas and probes down ones back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from moe_core import codec
from moe_core.config import MoeConfig
from moe_core.errors import ConfigError, UnavailableError
from moe_core.pb import expert_pb2
from router_service.expert_backend import ExpertBackend
from router_service.replica import Replica, ReplicaError
from router_service.shard_map import Part, Shard, ShardMap

log = logging.getLogger(__name__)


@dataclass
class DispatchStats:
    """Where layer steps spend their time, and what each shard was sent."""

    calls: int = 0  # layer steps dispatched
    seconds: float = 0.0  # wall time of those steps, from split to combined output
    shard_compute_seconds: float = 0.0  # the slowest shard's own compute, summed over steps
    retries: int = 0
    rows_sent: dict[str, torch.Tensor] = field(default_factory=dict)  # shard -> [layers, experts] rows

    @property
    def overhead_ms_per_call(self) -> float:
        return 1e3 * (self.seconds - self.shard_compute_seconds) / max(self.calls, 1)


class GrpcExperts(ExpertBackend):
    def __init__(self, cfg: MoeConfig, shard_map: ShardMap, revision: str, loop: asyncio.AbstractEventLoop,
                 rpc_timeout_s: float = 30.0):
        self.cfg, self.map, self.revision, self.loop = cfg, shard_map, revision, loop
        self.timeout = rpc_timeout_s
        self.stats = DispatchStats(rows_sent={s.shard_id: torch.zeros(cfg.num_hidden_layers, cfg.num_experts,
                                                                      dtype=torch.int64) for s in shard_map.shards})
        self._steps = itertools.count()
        self._lock = threading.Lock()

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        parts = self.map.split(layer, ids, weights)
        requests = [self._request(layer, x, part) for part in parts]
        if _running_loop() is self.loop:
            raise RuntimeError("GrpcExperts.forward must run off the event loop's thread (it blocks on it)")
        future = asyncio.run_coroutine_threadsafe(self._gather(parts, requests), self.loop)
        responses = future.result()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for part, response in zip(parts, responses, strict=True):
            out.index_add_(0, part.rows.to(x.device), codec.decode(response.output, "output").to(x.device).float())
        with self._lock:
            self.stats.calls += 1
            self.stats.seconds += time.perf_counter() - started
            self.stats.shard_compute_seconds += max((r.compute_seconds for r in responses), default=0.0)
            for part in parts:
                used = part.ids[part.ids >= 0].long()
                self.stats.rows_sent[part.shard.shard_id][layer] += torch.bincount(used, minlength=self.cfg.num_experts)
        return out.to(x.dtype)

    def _request(self, layer: int, x: torch.Tensor, part: Part) -> expert_pb2.ExpertRequest:
        return expert_pb2.ExpertRequest(model_revision=self.revision, layer=layer,
                                        hidden=codec.encode(x[part.rows.to(x.device)]),
                                        expert_ids=codec.encode(part.ids), expert_weights=codec.encode(part.weights),
                                        step_id=next(self._steps))

    async def _gather(self, parts: list[Part], requests: list[expert_pb2.ExpertRequest]
                      ) -> list[expert_pb2.ExpertResponse]:
        return await asyncio.gather(*(self._call(p.shard, r) for p, r in zip(parts, requests, strict=True)))

    async def _call(self, shard: Shard, request: expert_pb2.ExpertRequest) -> expert_pb2.ExpertResponse:
        tried: set[Replica] = set()
        last = "no replica is live"
        for _ in range(2):  # the first choice, then one retry on another replica
            replica = shard.pick(exclude=tried)
            if replica is None:
                break
            tried.add(replica)
            try:
                return await replica.forward(request, self.timeout)
            except ReplicaError as exc:
                if not exc.retryable:
                    raise
                replica.mark_down(str(exc))
                last = f"{replica.address}: {exc}"
                self.stats.retries += 1
        log.warning("expert shard %s has no live replica (%s)", shard.shard_id, last)
        raise UnavailableError(f"expert shard {shard.shard_id} has no live replica; try again shortly")

    async def aclose(self) -> None:
        await asyncio.gather(*(r.close() for s in self.map.shards for r in s.replicas))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def discover(cfg: MoeConfig, addresses: dict[str, list[str]], revision: str, timeout_s: float) -> ShardMap:
    """Ask every replica what it holds; wait until each shard has answered at least once."""
    shards = [Shard(shard_id, [Replica(shard_id, a) for a in addrs], set()) for shard_id, addrs in addresses.items()]
    deadline = time.monotonic() + timeout_s
    pending = [s for s in shards]
    while pending:
        await asyncio.gather(*(_describe_all(s, revision) for s in pending))
        pending = [s for s in shards if not s.live]
        if not pending:
            break
        if time.monotonic() > deadline:
            detail = "; ".join(f"{s.shard_id}: {r.address} ({r.last_error})" for s in pending for r in s.replicas)
            raise UnavailableError(f"expert shards did not answer within {timeout_s:.0f}s: {detail}")
        await asyncio.sleep(0.5)
    return ShardMap(cfg, shards)


async def _describe_all(shard: Shard, revision: str) -> None:
    for replica in shard.replicas:
        if not replica.live:
            await probe(replica, shard, revision)


HEALTH_TIMEOUT_S = 2.0  # generous: a busy 2-core machine must not turn a slow answer into a dead replica


async def probe(replica: Replica, shard: Shard, revision: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """Health-check a replica and verify what it serves; mark it live only if it is the right shard."""
    try:
        if not await replica.healthy(timeout):
            return False
        info = await replica.describe(timeout)
    except ReplicaError as exc:
        replica.last_error = str(exc)
        return False
    if info.model_revision != revision:
        raise ConfigError(f"replica {replica.address} of {shard.shard_id} serves model revision "
                          f"{info.model_revision}, the router runs {revision}")
    pairs = {(p.layer, p.expert) for p in info.experts}
    if shard.pairs and pairs != shard.pairs:
        raise ConfigError(f"replica {replica.address} of {shard.shard_id} holds other experts than the "
                          f"shard's other replicas")
    shard.pairs = pairs
    replica.mark_live()
    return True


async def monitor(shard_map: ShardMap, revision: str, interval_s: float, stop: asyncio.Event) -> None:
    """Health-check live replicas (mark failures down) and probe down ones back, until `stop` is set."""
    async def check(shard: Shard, replica: Replica) -> None:
        try:
            if replica.live and not await replica.healthy(HEALTH_TIMEOUT_S):
                replica.mark_down(replica.last_error or "health check failed")
            elif not replica.live:
                await probe(replica, shard, revision)
        except ConfigError as exc:
            log.error("%s", exc)

    while not stop.is_set():
        await asyncio.gather(*(check(s, r) for s in shard_map.shards for r in s.replicas))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
