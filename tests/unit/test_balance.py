"""`moe-serve plan`: placements balanced on measured expert load, hot experts copied, read from real metrics."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from moe_core.balance import copy_work, expected_work, plan_layer, plan_placement, rows_per_step
from moe_core.config import config_from_dict
from moe_core.errors import ConfigError
from moe_core.placement import even_split, load_placement, uncovered, write_placement
from moe_serve import cli
from moe_serve.plan import load_from_exposition
from router_service.metrics import EngineMetrics, RoutingStats
from router_service.replica import Replica
from router_service.shard_map import Shard, ShardMap

CFG = config_from_dict({"model_type": "qwen2_moe", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                        "moe_intermediate_size": 4, "num_hidden_layers": 4, "num_attention_heads": 2,
                        "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 2})  # MoE layers 1, 3


def skewed() -> torch.Tensor:
    """Rows per layer step. Layer 1: expert 0 takes 40 % of the rows; layer 3: a ramp."""
    per_step = torch.zeros(4, 8, dtype=torch.float64)
    per_step[1] = torch.tensor([700, 150, 150, 150, 150, 150, 150, 150])
    per_step[3] = torch.tensor([800, 700, 600, 500, 400, 300, 200, 100])
    return per_step


def test_balanced_load_places_every_expert_once_with_even_shares():
    per_step = torch.zeros(4, 8)
    per_step[[1, 3]] = 100.0
    specs, plans = plan_placement(CFG, per_step, 2)
    assert uncovered(CFG, specs) == []
    assert all(len(holders) == 1 for plan in plans.values() for holders in plan.holders)  # no copies
    assert [len(s.pairs) for s in specs] == [8, 8]
    assert all(plan.busiest_over_mean == 1.0 for plan in plans.values())


def test_a_hot_expert_is_copied_and_the_plan_beats_the_even_split():
    per_step = skewed()
    specs, plans = plan_placement(CFG, per_step, 2, slots=5)
    even = expected_work(CFG, even_split(CFG, 2), per_step)
    assert uncovered(CFG, specs) == []
    assert plans[1].holders[0] == [0, 1]  # 700 of 1750 rows: within 5 slots one copy cannot even it out
    assert plans[1].busiest_over_mean < 1.01 < 1.25 < even[1].busiest_over_mean
    assert plans[3].busiest_over_mean < 1.01 < 1.4 < even[3].busiest_over_mean  # 2600 vs 1000 rows evenly split
    for layer in CFG.moe_layers:  # the memory budget: at most `slots` experts per shard and layer
        assert all(sum(1 for pair in s.pairs if pair[0] == layer) <= 5 for s in specs)
    # What the plan promises is what the file describes.
    assert expected_work(CFG, specs, per_step)[1].work == pytest.approx(plans[1].work)


def test_the_router_sends_each_shard_the_rows_the_plan_expects(tmp_path):
    """Draw gate decisions from the measured load, split them with the router's ShardMap over the planned file."""
    per_step = skewed()
    specs, plans = plan_placement(CFG, per_step, 2, slots=5)
    path = tmp_path / "placement.json"
    write_placement(path, specs)
    loaded = load_placement(path, CFG)
    shards = [Shard(s.shard_id, [Replica(s.shard_id, f"127.0.0.1:{i}")], set(s.pairs)) for i, s in enumerate(loaded)]
    shard_map = ShardMap(CFG, shards)
    g = torch.Generator().manual_seed(0)
    rows = torch.zeros(2)
    for _ in range(40):  # steps of 64 rows, one expert per row drawn by the measured shares
        ids = torch.multinomial(per_step[1].float(), 64, replacement=True, generator=g)[:, None]
        for part in shard_map.split(1, ids, torch.ones(64, 1)):
            rows[int(part.shard.shard_id[-1])] += len(part.rows)
    planned = torch.zeros(2, dtype=torch.float64)  # each copy of an expert takes an equal share of its rows
    for expert, holders in enumerate(plans[1].holders):
        for shard in holders:
            planned[shard] += per_step[1, expert] / len(holders)
    assert torch.allclose(rows / rows.sum(), (planned / planned.sum()).float(), atol=0.03), (rows, planned)


def test_no_copy_is_added_where_it_does_not_lower_the_busiest_shard():
    plan = plan_layer([1.0] * 8, shards=2, slots=8)
    assert [len(h) for h in plan.holders] == [1] * 8
    plan = plan_layer([9.0, 1.0, 1.0, 1.0], shards=3, slots=4, expert_cost=0.0)
    assert len(plan.holders[0]) == 3 and max(plan.work) == pytest.approx(4.0)


def test_the_experts_fixed_cost_keeps_shards_from_holding_many_light_experts():
    """Rows alone would put the hot expert with one light one on a shard and six light ones on the other; each
    expert that runs also costs reading its weights, so the plan keeps the shards' expert counts close."""
    rows = [20.0] + [4.0] * 7
    by_rows = plan_layer(rows, shards=2, slots=8, expert_cost=0.0)
    assert sorted(len([e for e, h in enumerate(by_rows.holders) if s in h]) for s in range(2)) == [2, 6]
    by_work = plan_layer(rows, shards=2, slots=8, expert_cost=12.0)
    counts = sorted(len([e for e, h in enumerate(by_work.holders) if s in h]) for s in range(2))
    assert counts in ([3, 5], [4, 4])
    assert max(by_work.work) < max(expected_cost(by_rows, rows, 12.0))


def expected_cost(plan, rows: list[float], expert_cost: float) -> list[float]:
    """The work of a plan's shards under a fixed cost per expert it was not planned with."""
    work = [0.0, 0.0]
    for expert, holders in enumerate(plan.holders):
        for shard in holders:
            work[shard] += copy_work(rows[expert], len(holders), expert_cost)
    return work


def test_bad_plans_are_refused():
    with pytest.raises(ConfigError, match="--slots must be between 4"):
        plan_placement(CFG, skewed(), 2, slots=3)
    with pytest.raises(ConfigError, match="cannot place 8 experts on 9 shards"):
        plan_placement(CFG, skewed(), 9)
    with pytest.raises(ConfigError, match="load table is"):
        plan_placement(CFG, torch.zeros(2, 8), 2)
    with pytest.raises(ConfigError, match="--expert-cost must be >= 0"):
        plan_placement(CFG, skewed(), 2, expert_cost=-1.0)
    with pytest.raises(ConfigError, match="no engine steps"):
        rows_per_step(skewed(), 0)


def exposition(cfg, counts: dict[int, list[int]], steps: list[int]) -> str:
    """A router's real /metrics text (its RoutingStats collector and engine metrics) after routing `counts`
    per layer in engine steps of `steps` tokens."""
    stats = RoutingStats(cfg)
    for layer, per_expert in counts.items():
        stats.record(layer, torch.repeat_interleave(torch.arange(cfg.num_experts), torch.tensor(per_expert)))
    registry = CollectorRegistry()
    registry.register(stats)
    engine = EngineMetrics(registry)
    for tokens in steps:
        engine.step_tokens.observe(tokens)
    return generate_latest(registry).decode()


def test_router_scrapes_add_up_and_foreign_metrics_are_refused():
    one = load_from_exposition(CFG, exposition(CFG, {1: [5, 0, 0, 0, 0, 0, 0, 1], 3: [1] * 8}, [4, 3]), "a")
    two = load_from_exposition(CFG, exposition(CFG, {1: [1, 0, 0, 0, 0, 0, 0, 0]}, [1]), "b")
    tokens = one[0] + two[0]
    assert tokens[1].tolist() == [6, 0, 0, 0, 0, 0, 0, 1] and tokens[3].tolist() == [1] * 8
    assert not tokens[[0, 2]].any()
    assert (one[1], two[1]) == (2, 1)  # engine steps
    with pytest.raises(ConfigError, match="no moe_expert_tokens_total samples"):
        load_from_exposition(CFG, "# nothing here\nother_total 1\n", "x")
    foreign = exposition(CFG, {1: [1] * 8}, [1]).replace('expert="7"', 'expert="12"')
    with pytest.raises(ConfigError, match="metrics of another model"):
        load_from_exposition(CFG, foreign, "x")


def test_cli_writes_a_placement_that_up_can_read(tmp_path, tiny_checkpoint, capsys):
    from moe_core.config import load_config
    from tests.tiny_models import FAMILY_DEFAULT

    model = tiny_checkpoint(FAMILY_DEFAULT["mixtral"])
    cfg = load_config(model)
    light = 4 * 200  # over 4 steps: 200 rows per step for each expert but 0, which takes 60 % of all rows
    hot = light * (cfg.num_experts - 1) * 3 // 2
    scrape = tmp_path / "router.prom"
    scrape.write_text(exposition(cfg, {layer: [hot] + [light] * (cfg.num_experts - 1) for layer in cfg.moe_layers},
                                 [64] * 4))
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", str(model), "--shards", "2", "--metrics", str(scrape), "--out", str(out)]) == 0
    specs = load_placement(out, cfg)
    assert uncovered(cfg, specs) == []
    assert all((layer, 0) in s.pairs for s in specs for layer in cfg.moe_layers)  # the hot expert on both shards
    report = capsys.readouterr().err
    assert "worst layer" in report and "0x2" in report

    empty = tmp_path / "empty.prom"
    empty.write_bytes(generate_latest(CollectorRegistry()))
    assert cli.main(["plan", "--model", str(model), "--shards", "2", "--metrics", str(empty)]) == 2
    assert "no moe_expert_tokens_total samples" in capsys.readouterr().err
    assert cli.main(["plan", "--model", str(model), "--shards", "2", "--metrics", str(scrape), "--window", "1h"]) == 2
    assert "--window goes with --prometheus" in capsys.readouterr().err
