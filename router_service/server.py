"""Starting a router: load the dense model, find the expert shards, serve Generate, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from moe_core.checkpoint import Checkpoint
from moe_core.dtypes import resolve_device, resolve_dtype
from moe_core.loader import load_dense_model
from moe_core.metrics import serve_metrics
from moe_core.pb import router_pb2, router_pb2_grpc
from moe_core.placement import load_placement
from moe_core.revision import model_revision
from moe_core.rpc import Tls, add_health, bind, new_server, set_serving, stop_event_on_signals, write_ready_file
from moe_core.threads import compute_threads, serial_main_thread
from moe_core.tokenizer import Tokenizer
from moe_core.weights import load_experts
from router_service.cache import CacheConfig
from router_service.cached_experts import CachedExperts
from router_service.discovery import ReplicaSet, discover, monitor
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.loop import EngineLoop
from router_service.expert_backend import ExpertBackend, LocalExperts
from router_service.grpc_experts import GrpcExperts
from router_service.metrics import (
    DispatchMetrics,
    EngineMetrics,
    RoutingRecorder,
    RoutingStats,
    ShardHealth,
    new_registry,
)
from router_service.servicer import RouterServicer
from router_service.settings import RouterSettings
from router_service.shard_map import ShardMap

log = logging.getLogger("router_service")
SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


@dataclass
class Router:
    """Everything a running router holds."""

    engine: Engine
    revision: str
    registry: CollectorRegistry
    routing: RoutingStats
    shard_map: ShardMap | None = None
    replica_sets: list[ReplicaSet] | None = None
    grpc_experts: GrpcExperts | None = None


def shard_addresses(settings: RouterSettings, cfg) -> dict[str, list[str]]:
    if settings.placement:
        specs = load_placement(settings.placement, cfg)
        return {s.shard_id: s.replicas for s in specs}
    return settings.shard_addresses()


def expert_tls(settings: RouterSettings) -> Tls | None:
    if not settings.expert_tls_ca:
        return None
    return Tls(cert=settings.expert_tls_cert, key=settings.expert_tls_key, ca=settings.expert_tls_ca,
               server_name=settings.expert_tls_server_name)


def server_tls(settings: RouterSettings) -> Tls | None:
    return Tls(cert=settings.tls_cert, key=settings.tls_key, ca=settings.tls_client_ca) if settings.tls_cert else None


def cache_config(settings: RouterSettings) -> CacheConfig:
    return CacheConfig(mode=settings.cache, redis_url=settings.redis_url, ttl_s=settings.cache_ttl_s,
                       local_bytes=settings.cache_local_mib << 20, phases=settings.cache_phases,
                       prefix=settings.cache_prefix, redis_timeout_s=settings.cache_redis_timeout_ms / 1000)


def engine_config(settings: RouterSettings) -> EngineConfig:
    return EngineConfig(block_size=settings.block_size, kv_cache_bytes=settings.kv_cache_mib << 20,
                        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                        max_model_len=settings.max_model_len or None, seed=settings.seed, overlap=settings.overlap,
                        prefix_caching=settings.prefix_cache, draft_tokens=settings.draft_tokens)


async def build_router(settings: RouterSettings) -> Router:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    revision = model_revision(settings.model)
    ckpt = Checkpoint(settings.model)
    model = load_dense_model(settings.model, dtype, device, ckpt)
    registry = new_registry()
    routing = RoutingStats(model.cfg, settings.balance_window, settings.per_expert_metrics)
    registry.register(routing)
    shard_map = replica_sets = grpc_experts = None
    experts: ExpertBackend
    if settings.experts == "local":
        experts = LocalExperts(load_experts(ckpt, model.cfg, None, dtype, device))
    else:
        shard_map, replica_sets = await discover(model.cfg, shard_addresses(settings, model.cfg), revision,
                                                 settings.connect_timeout_s, expert_tls(settings))
        registry.register(ShardHealth(shard_map))
        experts = grpc_experts = GrpcExperts(model.cfg, shard_map, revision, asyncio.get_running_loop(),
                                             settings.rpc_timeout_s, DispatchMetrics(registry),
                                             data_plane=settings.expert_transport == "auto", tls=expert_tls(settings))
    cache = cache_config(settings)
    if cache.enabled:
        experts = CachedExperts(experts, cache, revision, registry, model.cfg.moe_layers)
        experts.reserve(model.cfg.hidden_size, model.dtype)
    engine = Engine(model, RoutingRecorder(experts, routing), _tokenizer(settings.model), engine_config(settings),
                    EngineMetrics(registry))
    return Router(engine, revision, registry, routing, shard_map, replica_sets, grpc_experts)


def _tokenizer(model_dir: str) -> Tokenizer | None:
    """The router detokenizes for stop strings and streamed text; a bare checkpoint still serves token ids."""
    if not (Path(model_dir) / "tokenizer.json").exists():
        log.warning("%s has no tokenizer.json: no text in outputs, stop strings refused", model_dir)
        return None
    return Tokenizer.from_dir(model_dir)


async def serve(settings: RouterSettings) -> None:
    threads = compute_threads(settings.threads)
    serial_main_thread()  # the engine thread owns the process's one OpenMP team (moe_core/threads.py)
    router = await build_router(settings)
    engine = router.engine
    info = router_pb2.ModelInfo(model_id=settings.model_id or Path(settings.model).resolve().name,
                                model_revision=router.revision, model_type=engine.model.cfg.model_type,
                                vocab_size=engine.model.cfg.vocab_size, max_model_len=engine.max_model_len,
                                created=int(time.time()), experts_backend=settings.experts)
    loop = EngineLoop(engine, threads).start()
    server = new_server()
    servicer = RouterServicer(loop, info, router, settings.max_queue)
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    health = add_health(server)
    port = bind(server, settings.host, settings.port, server_tls(settings))
    await server.start()
    metrics_port = serve_metrics(settings.metrics_port, settings.host, router.registry)
    await set_serving(health, [SERVICE], True)
    stop = stop_event_on_signals()
    watcher = None
    if router.replica_sets:
        watcher = asyncio.create_task(monitor(router.replica_sets, router.revision, settings.health_interval_s, stop))
    log.info("router serving %s (revision %s, experts %s, KV cache %d tokens) at %s:%d", info.model_id,
             router.revision, settings.experts, engine.kv.capacity_tokens, settings.host, port)
    write_ready_file(settings.ready_file, port=port, metrics_port=metrics_port, role="router")
    await stop.wait()
    await drain(servicer, health, loop, settings.drain_timeout_s)
    await server.stop(grace=2.0)
    if watcher:
        await watcher
    if router.grpc_experts:
        await router.grpc_experts.aclose()
    engine.experts.close()


async def drain(servicer: RouterServicer, health, loop: EngineLoop, timeout_s: float) -> None:
    """Stop intake (readiness first), let accepted requests finish for up to `timeout_s`, end the rest cleanly."""
    servicer.draining = True
    await set_serving(health, [SERVICE], False)
    log.info("draining: %d requests in flight, up to %.0fs", loop.in_flight, timeout_s)
    deadline = time.monotonic() + timeout_s
    while loop.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if loop.in_flight:
        log.warning("%d requests still running after %.0fs; ending them with an error", loop.in_flight, timeout_s)
    await asyncio.to_thread(loop.stop)  # any request left ends with UNAVAILABLE, never silently


def run(settings: RouterSettings) -> None:
    asyncio.run(serve(settings))
