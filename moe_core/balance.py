"""A placement planned from measured expert load: whole experts spread so each layer's shards get equal work,
hot experts copied to several shards.

Pure arithmetic over the rows the gates sent to each (layer, expert) and the number of steps they came in
(the router's `moe_expert_tokens_total` and `moe_step_tokens_count`); `moe_serve/plan.py` reads them from
a router or from Prometheus.

Every layer step waits for its slowest shard, so the work to balance is each layer's, not the sum over
layers. A shard's work in a layer step is, for each expert it holds that gets rows, a fixed part (reading
the expert's weights) plus a part per row: an expert with λ rows per step on average costs
λ + expert_cost × P(it gets any), with P = 1 − e^−λ (rows arriving independently). `expert_cost` is the
fixed part in rows' worth of work: about 12 on the CPUs of bench/RESULTS.md ("Placement from measured
load"), a few hundred on a GPU. The router spreads a copied expert's rows over its holders round-robin
(router_service/shard_map.py), so each of c copies gets λ / c. An expert too hot for one shard is copied
where that lowers the busiest shard's work, within each shard's budget of expert slots per layer (memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_core.config import MoeConfig
from moe_core.errors import ConfigError
from moe_core.placement import Pair, ShardSpec

EXPERT_COST = 12.0  # rows' worth of work an expert costs whenever it runs (bf16 and float32 here, one thread)
IMPROVEMENT = 1e-3  # a change is kept only if it lowers the busiest shard's work by more than this fraction
MAX_MOVES = 1000  # local-search moves per layer (each strictly lowers the busiest shard's work)


@dataclass
class LayerPlan:
    holders: list[list[int]]  # per expert: the shards holding a copy
    work: list[float]  # expected work per shard and layer step, in rows

    @property
    def busiest_over_mean(self) -> float:
        """1.0 = every shard does the same work; 2.0 = the busiest shard does twice the mean."""
        mean = sum(self.work) / len(self.work)
        return max(self.work) / mean if mean > 0 else 1.0


def copy_work(rows: float, copies: int, expert_cost: float) -> float:
    """Expected work of one of `copies` copies of an expert that gets `rows` rows per layer step."""
    share = rows / copies
    return share + expert_cost * -math.expm1(-share)


def default_slots(cfg: MoeConfig, shards: int) -> int:
    """An even split's experts per shard, plus one slot for a hot expert's copy (none with one shard)."""
    even = math.ceil(cfg.num_experts / shards)
    return min(cfg.num_experts, even + (1 if shards > 1 else 0))


def plan_layer(rows: list[float], shards: int, slots: int, expert_cost: float = EXPERT_COST) -> LayerPlan:
    """Copies and holders of one layer's experts that minimise the busiest shard's expected work.

    rows: each expert's rows per layer step. Copies are added to the expert whose copies are heaviest while
    that lowers the busiest shard's work; each candidate is placed longest-first, then improved by moves and
    swaps of copies between the busiest shard and the others."""
    experts = len(rows)
    if shards < 1 or slots < 1 or slots * shards < experts:
        raise ConfigError(f"{shards} shards x {slots} expert slots cannot hold {experts} experts")
    copies = [1] * experts
    best = _assign(rows, copies, shards, slots, expert_cost)
    assert best is not None  # one copy each always fits: slots * shards >= experts
    while sum(copies) < slots * shards:
        candidates = [e for e in range(experts) if copies[e] < shards and rows[e] > 0]
        if not candidates:
            break
        hot = max(candidates, key=lambda e: (rows[e] / copies[e], -e))
        copies[hot] += 1
        trial = _assign(rows, copies, shards, slots, expert_cost)
        if trial is None or max(trial.work) >= max(best.work) * (1 - IMPROVEMENT):
            copies[hot] -= 1
            break
        best = trial
    return best


def _assign(rows: list[float], copies: list[int], shards: int, slots: int, expert_cost: float) -> LayerPlan | None:
    """Longest first (each copy to the least busy shard with room that lacks it), then local moves.

    None when a copy finds no such shard (every shard with room already holds that expert)."""
    cost = [copy_work(rows[e], copies[e], expert_cost) for e in range(len(rows))]
    pieces = sorted((e for e in range(len(rows)) for _ in range(copies[e])), key=lambda e: (-cost[e], -copies[e], e))
    held: list[set[int]] = [set() for _ in range(shards)]
    work = [0.0] * shards
    for expert in pieces:
        room = [s for s in range(shards) if len(held[s]) < slots and expert not in held[s]]
        if not room:
            return None
        shard = min(room, key=lambda s: (work[s], len(held[s]), s))
        work[shard] += cost[expert]
        held[shard].add(expert)
    _improve(held, work, cost, slots)
    return LayerPlan([sorted(s for s in range(shards) if e in held[s]) for e in range(len(rows))], work)


def _improve(held: list[set[int]], work: list[float], cost: list[float], slots: int) -> None:
    """Move a copy off the busiest shard, or swap one with a lighter copy elsewhere, while that lowers the
    busiest shard's work (the best such change each time)."""
    for _ in range(MAX_MOVES):
        busiest = max(range(len(work)), key=lambda s: (work[s], -s))
        top, best = work[busiest], None
        for other in range(len(work)):
            if other == busiest:
                continue
            for expert in sorted(held[busiest] - held[other]):
                if len(held[other]) < slots:  # a move
                    worst = max(top - cost[expert], work[other] + cost[expert])
                    if worst < top * (1 - IMPROVEMENT) and (best is None or worst < best[0]):
                        best = (worst, other, expert, None)
                for back in sorted(held[other] - held[busiest]):  # a swap
                    delta = cost[expert] - cost[back]
                    worst = max(top - delta, work[other] + delta)
                    if delta > 0 and worst < top * (1 - IMPROVEMENT) and (best is None or worst < best[0]):
                        best = (worst, other, expert, back)
        if best is None:
            return
        _, other, expert, back = best
        held[busiest].remove(expert)
        held[other].add(expert)
        work[busiest] -= cost[expert]
        work[other] += cost[expert]
        if back is not None:
            held[other].remove(back)
            held[busiest].add(back)
            work[other] -= cost[back]
            work[busiest] += cost[back]


def rows_per_step(tokens: torch.Tensor, steps: float) -> torch.Tensor:
    """[num_hidden_layers, experts] rows routed in all, over `steps` layer steps -> rows per layer step."""
    if not steps > 0:
        raise ConfigError("the metrics count no engine steps: serve some traffic first")
    return tokens.double() / steps


def plan_placement(cfg: MoeConfig, per_step: torch.Tensor, shards: int, slots: int | None = None,
                   expert_cost: float = EXPERT_COST) -> tuple[list[ShardSpec], dict[int, LayerPlan]]:
    """per_step [num_hidden_layers, experts] rows per layer step -> shard specs and each MoE layer's plan."""
    if per_step.shape != (cfg.num_hidden_layers, cfg.num_experts):
        raise ConfigError(f"expert load table is {tuple(per_step.shape)}, the model has "
                          f"{cfg.num_hidden_layers} layers x {cfg.num_experts} experts")
    if not 1 <= shards <= cfg.num_experts:
        raise ConfigError(f"cannot place {cfg.num_experts} experts on {shards} shards")
    if expert_cost < 0:
        raise ConfigError(f"--expert-cost must be >= 0, got {expert_cost}")
    slots = default_slots(cfg, shards) if slots is None else slots
    if not math.ceil(cfg.num_experts / shards) <= slots <= cfg.num_experts:
        raise ConfigError(f"--slots must be between {math.ceil(cfg.num_experts / shards)} (every expert placed) "
                          f"and {cfg.num_experts}, got {slots}")
    plans = {layer: plan_layer([float(v) for v in per_step[layer].tolist()], shards, slots, expert_cost)
             for layer in cfg.moe_layers}
    pairs: list[list[Pair]] = [[] for _ in range(shards)]
    for layer, plan in plans.items():
        for expert, holders in enumerate(plan.holders):
            for shard in holders:
                pairs[shard].append((layer, expert))
    return [ShardSpec(f"shard-{i}", sorted(p)) for i, p in enumerate(pairs)], plans


def expected_work(cfg: MoeConfig, specs: list[ShardSpec], per_step: torch.Tensor,
                  expert_cost: float = EXPERT_COST) -> dict[int, LayerPlan]:
    """What each shard of a whole-expert placement does per MoE layer step (to compare placements)."""
    plans, held = {}, [set(spec.pairs) for spec in specs]
    for layer in cfg.moe_layers:
        holders = [[i for i, pairs in enumerate(held) if (layer, e) in pairs] for e in range(cfg.num_experts)]
        work = [0.0] * len(specs)
        for expert, owners in enumerate(holders):
            for shard in owners:
                work[shard] += copy_work(float(per_step[layer, expert]), len(owners), expert_cost)
        plans[layer] = LayerPlan(holders, work)
    return plans
