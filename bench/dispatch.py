"""One layer step's dispatch against real expert services, by transport: wall time, shard compute, overhead.

    python -m bench.dispatch --preset bench-s --dtype bfloat16 --rows 1 32 --steps 400

Starts the shards of `moe-serve up --shards 2` (one torch thread each, as `up` starts them) and drives
the router's expert backend from this process's thread, as the engine thread does: the data plane
(the default hot path) against gRPC ForwardStream messages, side by side. "Overhead" is the wall time
minus the slowest shard's own compute: framing, the wire, wake-ups, the router's split and combine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.models import make_bench_model
from moe_core.config import load_config
from moe_core.placement import ShardSpec, even_split, write_placement
from moe_core.revision import model_revision
from moe_serve import up
from moe_serve.launcher import ProcessGroup
from router_service.discovery import discover
from router_service.grpc_experts import GrpcExperts


def layer_inputs(cfg, rows: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cfg.hidden_size, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.num_experts_per_tok] for _ in range(rows)])
    weights = torch.rand(rows, cfg.num_experts_per_tok, generator=g)
    return x, weights, ids


def measure(experts: GrpcExperts, drawn: list, count: int, warmup: int) -> dict[str, float]:
    """Time `count` layer steps cycling through `drawn` ((layer, x, weights, ids) each), after `warmup` untimed."""
    for i in range(warmup):
        experts.forward(*drawn[i % len(drawn)])
    stats = experts.stats
    calls, seconds, compute = stats.calls, stats.seconds, stats.shard_compute_seconds
    for i in range(count):
        experts.forward(*drawn[i % len(drawn)])
    n = stats.calls - calls
    wall, shard = (stats.seconds - seconds) / n, (stats.shard_compute_seconds - compute) / n
    return {"dispatch_ms": round(1e3 * wall, 3), "shard_compute_ms": round(1e3 * shard, 3),
            "overhead_ms": round(1e3 * (wall - shard), 3)}


@contextmanager
def expert_services(model: Path, cfg, specs: list[ShardSpec], dtype: str):
    """The shards of `specs` as expert services, started as `moe-serve up` starts them (one torch thread each);
    yields (shard map, model revision, the event loop their channels live on)."""
    run_dir = Path(tempfile.mkdtemp(prefix="dispatch-"))
    flags = up.build_args(["--model", str(model), "--shards", str(len(specs)), "--dtype", dtype,
                           "--run-dir", str(run_dir)])
    group = ProcessGroup(run_dir, out=(run_dir / "services.log").open("w"), color=False)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        write_placement(run_dir / "placement.json", specs)
        services = up.start_experts(group, flags, model, specs, run_dir / "placement.json")
        group.wait_ready(services, 300)
        addresses = {s.info["shard"]: [f"127.0.0.1:{s.port}"] for s in services}
        revision = model_revision(model)
        shard_map, _ = asyncio.run_coroutine_threadsafe(discover(cfg, addresses, revision, 60), loop).result()
        yield shard_map, revision, loop
    finally:
        group.stop()
        loop.call_soon_threadsafe(loop.stop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-s")
    p.add_argument("--model", type=Path, help="this model folder instead of a preset")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="token rows per layer step")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--work-dir", type=Path, default=Path("bench/out"))
    args = p.parse_args()
    model = args.model or make_bench_model(args.preset, args.work_dir / "models" / args.preset)
    cfg = load_config(model)
    with expert_services(model, cfg, even_split(cfg, 2), args.dtype) as (shard_map, revision, loop):
        torch.set_num_threads(1)
        layer = cfg.moe_layers[len(cfg.moe_layers) // 2]
        backends = {"data plane": GrpcExperts(cfg, shard_map, revision, loop, data_plane=True),
                    "grpc": GrpcExperts(cfg, shard_map, revision, loop, data_plane=False)}
        for rows in args.rows:
            drawn = [(layer, *layer_inputs(cfg, rows, getattr(torch, args.dtype)))]
            for transport, experts in backends.items():
                timed = measure(experts, drawn, args.steps, warmup=min(50, args.steps))
                result = {"rows": rows, "transport": transport, **timed}
                print(json.dumps(result), flush=True)
        asyncio.run_coroutine_threadsafe(backends["grpc"].aclose(), loop).result()


if __name__ == "__main__":
    main()
