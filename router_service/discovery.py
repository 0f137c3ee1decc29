"""Finding the expert replicas and keeping their health current.

A replica address is `host:port`. When `host` is a DNS name (not an IP literal, not `localhost`),
every address it resolves to is a replica: a Kubernetes headless Service or a compose service with
several replicas names all of a shard's pods at once. Names are resolved again while serving, so
replicas that scale in or out join or leave without a router restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time

from moe_core.config import MoeConfig
from moe_core.errors import ConfigError, UnavailableError
from moe_core.rpc import Tls
from router_service.replica import Replica, ReplicaError
from router_service.shard_map import Shard, ShardMap

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 2.0  # generous: a busy 2-core machine must not turn a slow answer into a dead replica
RESOLVE_EVERY = 5  # health rounds between DNS lookups


def _is_name(host: str) -> bool:
    if host == "localhost":
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
        return False
    except ValueError:
        return True


async def resolve(address: str) -> list[str]:
    """`name:port` -> one `ip:port` per address the name resolves to; IPs and localhost pass through."""
    host, _, port = address.rpartition(":")
    if not _is_name(host):
        return [address]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, OSError) as exc:
        log.warning("cannot resolve %s: %s", host, exc)
        return []
    found = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        found.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(set(found))


class ReplicaSet:
    """The configured addresses of one shard and the replicas they currently stand for."""

    def __init__(self, shard: Shard, configured: list[str], tls: Tls | None = None):
        self.shard, self.configured, self.tls = shard, configured, tls

    async def refresh(self) -> None:
        wanted = [a for address in self.configured for a in await resolve(address)]
        if not wanted:  # a failed lookup must not take every replica away
            return
        current = {r.address: r for r in self.shard.replicas}
        for address in wanted:
            if address not in current:
                log.info("shard %s: new replica %s", self.shard.shard_id, address)
                self.shard.replicas.append(Replica(self.shard.shard_id, address, self.tls))
        for address, replica in current.items():
            if address not in wanted and any(_is_name(a.rpartition(":")[0]) for a in self.configured):
                log.info("shard %s: replica %s left", self.shard.shard_id, address)
                self.shard.replicas.remove(replica)
                await replica.close()


async def discover(cfg: MoeConfig, addresses: dict[str, list[str]], revision: str, timeout_s: float,
                   tls: Tls | None = None) -> tuple[ShardMap, list[ReplicaSet]]:
    """Resolve and ask every replica what it holds; wait until each shard has a live replica."""
    sets = [ReplicaSet(Shard(shard_id, [], set()), list(addrs), tls) for shard_id, addrs in addresses.items()]
    deadline = time.monotonic() + timeout_s
    while True:
        for replica_set in sets:
            if not replica_set.shard.live:
                await replica_set.refresh()
                await asyncio.gather(*(probe(r, replica_set.shard, revision) for r in replica_set.shard.replicas))
        pending = [s.shard for s in sets if not s.shard.live]
        if not pending:
            return ShardMap(cfg, [s.shard for s in sets]), sets
        if time.monotonic() > deadline:
            detail = "; ".join(f"{s.shard_id}: " + (", ".join(f"{r.address} ({r.last_error})" for r in s.replicas)
                                                   or "no address resolved") for s in pending)
            raise UnavailableError(f"expert shards did not answer within {timeout_s:.0f}s: {detail}")
        await asyncio.sleep(0.5)


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
    ffn = (info.ffn_part, info.ffn_parts) if info.ffn_parts > 1 else (0, 1)
    if shard.pairs and (pairs, ffn) != (shard.pairs, shard.ffn):
        raise ConfigError(f"replica {replica.address} of {shard.shard_id} holds other experts (or another part "
                          f"of their FFN) than the shard's other replicas")
    shard.pairs, shard.ffn = pairs, ffn
    replica.data_port = info.data_port
    replica.mark_live()
    return True


async def monitor(sets: list[ReplicaSet], revision: str, interval_s: float, stop: asyncio.Event) -> None:
    """Health-check live replicas (mark failures down), probe down ones back, re-resolve DNS names."""

    async def check(shard: Shard, replica: Replica) -> None:
        try:
            if replica.live and not await replica.healthy(HEALTH_TIMEOUT_S):
                replica.mark_down(replica.last_error or "health check failed")
            elif not replica.live:
                await probe(replica, shard, revision)
        except ConfigError as exc:
            log.error("%s", exc)

    rounds = 0
    while not stop.is_set():
        if rounds % RESOLVE_EVERY == 0:
            for replica_set in sets:
                await replica_set.refresh()
        rounds += 1
        await asyncio.gather(*(check(s.shard, r) for s in sets for r in list(s.shard.replicas)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
