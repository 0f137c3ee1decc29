"""Starting an expert service: load this shard's experts, serve them, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path

from expert_service.data_plane import bound_port, serve_data_plane
from expert_service.metrics import ExpertMetrics
from expert_service.servicer import ExpertServicer
from expert_service.settings import ExpertSettings
from expert_service.shard import ExpertShard
from moe_core.checkpoint import Checkpoint
from moe_core.config import load_config
from moe_core.dtypes import resolve_device, resolve_dtype
from moe_core.errors import ConfigError
from moe_core.metrics import serve_metrics
from moe_core.pb import expert_pb2, expert_pb2_grpc
from moe_core.placement import ShardSpec, load_placement, pairs_from_spec, parse_ffn, parse_ids
from moe_core.revision import model_revision
from moe_core.rpc import Tls, add_health, bind, new_server, set_serving, stop_event_on_signals, write_ready_file
from moe_core.threads import compute_threads, use_threads
from moe_core.weights import load_experts

log = logging.getLogger("expert_service")
SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


def shard_spec(settings: ExpertSettings, cfg) -> ShardSpec:
    if settings.placement:
        for spec in load_placement(settings.placement, cfg):
            if spec.shard_id == settings.shard_id:
                return spec
        raise ConfigError(f"{settings.placement}: no shard named '{settings.shard_id}'")
    layers = None if settings.layers is None else parse_ids(settings.layers, cfg.num_hidden_layers, "--layers")
    ffn = parse_ffn(settings.ffn, "--ffn", cfg.moe_intermediate_size)
    return ShardSpec(settings.shard_id, pairs_from_spec(cfg, settings.experts, layers, "--experts"), ffn=ffn)


def build_shard(settings: ExpertSettings) -> ExpertShard:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    cfg = load_config(settings.model)
    spec = shard_spec(settings, cfg)
    experts = load_experts(Checkpoint(settings.model), cfg, spec.pairs, dtype, device, ffn=spec.ffn)
    return ExpertShard(cfg, experts, model_id=settings.model_id or Path(settings.model).resolve().name,
                       revision=model_revision(settings.model), shard_id=settings.shard_id,
                       replica_id=f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                       dtype=dtype, device=device, ffn=spec.ffn)


async def serve(settings: ExpertSettings) -> None:
    use_threads(compute_threads(settings.threads))  # this thread computes every forward (servicer.py)
    shard = build_shard(settings)
    server = new_server()
    metrics = ExpertMetrics(shard, settings.per_expert_metrics)
    servicer = ExpertServicer(shard, metrics)
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, server)
    health = add_health(server)
    tls = Tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert else None
    port = bind(server, settings.host, settings.port, tls)
    await server.start()
    data_plane = None if settings.data_port < 0 else await serve_data_plane(servicer, settings.host,
                                                                             settings.data_port, tls)
    shard.data_port = bound_port(data_plane) if data_plane else 0
    metrics_port = serve_metrics(settings.metrics_port, settings.host, metrics.registry)
    await set_serving(health, [SERVICE], True)
    held = sum(len(e.expert_ids) for e in shard.experts.values())
    part = f" (FFN part {shard.ffn[0] + 1} of {shard.ffn[1]})" if shard.ffn[1] > 1 else ""
    log.info("shard %s serving %d experts%s over %d layers of %s (revision %s, %s on %s) at %s:%d",
             shard.shard_id, held, part, len(shard.experts), shard.model_id, shard.revision, shard.dtype,
             shard.device, settings.host, port)
    if data_plane:
        log.info("data plane at %s:%d", settings.host, shard.data_port)
    write_ready_file(settings.ready_file, port=port, metrics_port=metrics_port, data_port=shard.data_port,
                     role="expert", shard=shard.shard_id)
    stop = stop_event_on_signals()
    await stop.wait()
    # Readiness first: routers' health checks see NOT_SERVING and move traffic to other replicas while
    # this one still answers what they send; then in-flight calls get a grace period.
    log.info("draining for %.1fs", settings.drain_grace_s)
    await set_serving(health, [SERVICE], False)
    await asyncio.sleep(settings.drain_grace_s)
    if data_plane:
        data_plane.close()
    await server.stop(grace=5.0)
    log.info("stopped")


def run(settings: ExpertSettings) -> None:
    asyncio.run(serve(settings))
