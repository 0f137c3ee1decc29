"""Layer steps under skewed routing: the even split against the placement `moe-serve plan` makes, side by side.

    python -m bench.placement --preset bench-s --dtype bfloat16 --skew 1.0 --rows 32 256 --steps 200 --rounds 2

Real MoE models route unevenly: some experts of a layer take several times the rows of others, and which
ones differs by layer. Here each MoE layer's expert shares follow a Zipf law (share of the r-th most
popular expert ∝ 1 / r^skew, a different order per layer); each row's top-k experts are drawn from those
shares without repeats. The plan is made from the drawn steps' counts per (layer, expert) and their number,
as `moe-serve plan` makes it from a router's counters, once per step size. Both placements run as real
expert services (2 shards, as `moe-serve up` starts them) driven by the router's expert backend over the
data plane, the layers taken in turn; the rounds alternate the placements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import torch

from bench.dispatch import expert_services, measure
from bench.models import make_bench_model
from moe_core.balance import expected_work, plan_placement, rows_per_step
from moe_core.config import MoeConfig, load_config
from moe_core.placement import ShardSpec, even_split
from router_service.grpc_experts import GrpcExperts


def zipf_shares(cfg: MoeConfig, skew: float, seed: int = 0) -> torch.Tensor:
    """[num_hidden_layers, experts] routing shares; each MoE layer its own order of popularity."""
    g = torch.Generator().manual_seed(seed)
    shares = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.float64)
    ranked = 1.0 / torch.arange(1, cfg.num_experts + 1, dtype=torch.float64) ** skew
    for layer in cfg.moe_layers:
        shares[layer, torch.randperm(cfg.num_experts, generator=g)] = ranked / ranked.sum()
    return shares


def steps(cfg: MoeConfig, shares: torch.Tensor, rows: int, dtype: torch.dtype, per_layer: int = 8, seed: int = 1):
    """Layer steps to cycle through: (layer, x, weights, ids), `per_layer` draws for every MoE layer."""
    g = torch.Generator().manual_seed(seed)
    drawn = []
    for _ in range(per_layer):
        for layer in cfg.moe_layers:
            ids = torch.multinomial(shares[layer].float().expand(rows, -1), cfg.num_experts_per_tok,
                                    generator=g)
            x = torch.randn(rows, cfg.hidden_size, generator=g).to(dtype)
            drawn.append((layer, x, torch.rand(rows, cfg.num_experts_per_tok, generator=g), ids))
    return drawn


def counted(cfg: MoeConfig, drawn: list) -> torch.Tensor:
    """What the router's counters would hold after these steps, over their number per layer: rows per step."""
    tokens = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.float64)
    for layer, _, _, ids in drawn:
        tokens[layer] += torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)
    return rows_per_step(tokens, len(drawn) / len(cfg.moe_layers))


def run_placement(model: Path, cfg: MoeConfig, specs: list[ShardSpec], dtype: str, drawn: list,
                  count: int) -> dict[str, float]:
    with expert_services(model, cfg, specs, dtype) as (shard_map, revision, loop):
        torch.set_num_threads(1)
        experts = GrpcExperts(cfg, shard_map, revision, loop)
        timed = measure(experts, drawn, count, warmup=len(drawn))  # warm-up: every layer's weights touched once
        asyncio.run_coroutine_threadsafe(experts.aclose(), loop).result()
        return {"dispatch_ms": timed["dispatch_ms"], "slowest_shard_ms": timed["shard_compute_ms"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-s")
    p.add_argument("--model", type=Path, help="this model folder instead of a preset")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of each layer's expert shares")
    p.add_argument("--rows", type=int, nargs="+", default=[32, 256], help="token rows per layer step")
    p.add_argument("--steps", type=int, default=200, help="layer steps timed per row count and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slots", type=int, help="the plan's expert slots per shard and layer (default: plan's)")
    p.add_argument("--work-dir", type=Path, default=Path("bench/out"))
    args = p.parse_args()
    model = args.model or make_bench_model(args.preset, args.work_dir / "models" / args.preset)
    cfg = load_config(model)
    shares = zipf_shares(cfg, args.skew)
    runs = []
    for rows in args.rows:
        drawn = steps(cfg, shares, rows, getattr(torch, args.dtype))
        per_step = counted(cfg, drawn)
        placements = {"even": even_split(cfg, 2), "plan": plan_placement(cfg, per_step, 2, args.slots)[0]}
        for name, specs in placements.items():
            work = expected_work(cfg, specs, per_step)
            print(json.dumps({"rows": rows, "placement": name, "experts_per_shard": [len(s.pairs) for s in specs],
                              "expected_busiest_over_mean": {layer: round(p.busiest_over_mean, 3)
                                                             for layer, p in work.items()}}), flush=True)
            runs.append((rows, name, specs, drawn))
    for round_ in range(args.rounds):
        for rows, name, specs, drawn in runs:
            result = run_placement(model, cfg, specs, args.dtype, drawn, args.steps)
            print(json.dumps({"round": round_, "placement": name, "rows": rows, **result}), flush=True)


if __name__ == "__main__":
    main()
