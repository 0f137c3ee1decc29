"""`moe-serve bench --rounds`: configurations run interleaved, and the report gives spreads and per-round ratios."""

from __future__ import annotations

import argparse
import json

import pytest

import bench.run
from bench.report import ratio_lines, render, spread_table


def _run(concurrency: int, tok_s: float, tpot: float) -> dict:
    stats = {"p50": 1.0, "p90": 2.0, "p99": 3.0}
    return {"concurrency": concurrency, "requests": 4, "errors": 0, "output_tok_s": tok_s, "ttft_ms": stats,
            "tpot_ms": {"p50": tpot, "p90": tpot, "p99": tpot}, "itl_ms": stats, "e2e_ms": stats}


def _report(configs: list[tuple[str, dict[int, float]]]) -> dict:
    return {"preset": "bench-s", "model": "m", "dtype": "float32", "git": "abc", "machine": "x", "started": "now",
            "workload": {}, "configs": [{"config": name, "runs": [_run(c, t, 1000 / t) for c, t in tput.items()]}
                                        for name, tput in configs]}


def test_ratios_are_taken_within_each_round_and_summarized_by_their_median():
    report = _report([("local", {32: 100.0}), ("cluster-2", {32: 80.0}),
                      ("local", {32: 120.0}), ("cluster-2", {32: 84.0}),
                      ("local", {32: 100.0}), ("cluster-2", {32: 90.0})])
    # rounds: 0.80, 0.70, 0.90; a ratio of medians (84 / 100) would hide the spread
    assert ratio_lines(report, ["local:cluster-2"]) == [
        "- cluster-2 / local output tok/s: c=32: 0.80× (rounds 0.80, 0.70, 0.90)"]
    spread = spread_table(report)
    assert "| local | 32 | 3 | 100.0 (100.0–120.0) | 10.0 (8.3–10.0) |" in spread
    assert "| cluster-2 | 32 | 3 | 84.0 (80.0–90.0) | 11.9 (11.1–12.5) |" in spread
    assert "| cluster-2 | 32 | 3 | 84.0 (80.0–90.0)" in render(report, ["local:cluster-2"])


def test_a_single_round_keeps_the_plain_ratio_and_no_spread_table():
    report = _report([("local", {1: 40.0, 32: 100.0}), ("cluster-2", {1: 20.0, 32: 85.0})])
    assert spread_table(report) == []
    assert ratio_lines(report, ["local:cluster-2"]) == ["- cluster-2 / local output tok/s: c=1: 0.50×, c=32: 0.85×"]


def test_a_baseline_that_ran_fewer_rounds_is_compared_through_its_last_round():
    report = _report([("transformers", {32: 50.0}), ("cluster-2", {32: 100.0}), ("cluster-2", {32: 150.0})])
    assert ratio_lines(report, ["transformers:cluster-2"]) == [
        "- cluster-2 / transformers output tok/s: c=32: 2.50× (rounds 2.00, 3.00)"]


def test_a_configuration_named_with_a_colon_pairs_at_the_right_colon():
    pinned = "cluster-2@PYTHONPATH=/tmp/pin:/tmp/final,PIN=1"
    report = _report([("cluster-2", {32: 100.0}), (pinned, {32: 90.0})])
    assert ratio_lines(report, [f"cluster-2:{pinned}"]) == [f"- {pinned} / cluster-2 output tok/s: c=32: 0.90×"]
    with pytest.raises(SystemExit, match="the report has no local"):
        ratio_lines(report, ["local:cluster-2"])
    with pytest.raises(SystemExit, match="no second configuration"):
        ratio_lines(report, ["cluster-2"])


def test_rounds_run_the_configuration_list_interleaved(monkeypatch, tiny_checkpoint, tmp_path):
    order = []

    def fake_bench_config(name, model, args, workloads):
        order.append(name)
        return {"config": name, "runs": [_run(level.concurrency, 10.0 * len(order), 5.0) for level in workloads]}

    monkeypatch.setattr(bench.run, "bench_config", fake_bench_config)
    parser = argparse.ArgumentParser()
    bench.run.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--model", str(tiny_checkpoint("mixtral-gqa2-top2")), "--configs", "local", "cluster-2",
                              "--rounds", "2", "--concurrency", "1", "--requests", "2", "--out", str(out),
                              "--work-dir", str(tmp_path)])
    assert bench.run.run(args) == 0
    report = json.loads(out.read_text())
    assert order == ["local", "cluster-2", "local", "cluster-2"]
    assert report["rounds"] == 2
    assert [(c["config"], c["round"]) for c in report["configs"]] == [
        ("local", 1), ("cluster-2", 1), ("local", 2), ("cluster-2", 2)]
    assert ratio_lines(report, ["local:cluster-2"]) == [
        "- cluster-2 / local output tok/s: c=1: 1.67× (rounds 2.00, 1.33)"]


def test_rounds_below_one_are_refused(tiny_checkpoint, tmp_path):
    parser = argparse.ArgumentParser()
    bench.run.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_checkpoint("mixtral-gqa2-top2")), "--rounds", "0",
                              "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        bench.run.run(args)


def test_cpu_summary_splits_cpu_by_service_and_gives_the_busy_share(monkeypatch):
    monkeypatch.setattr(bench.run.os, "cpu_count", lambda: 2)
    before = {"router 0": 10.0, "expert 0.0": 4.0, "gateway": 1.0}
    after = {"router 0": 11.0, "expert 0.0": 4.5, "gateway": 1.1}
    summary = bench.run.cpu_summary(before, after, 0.2, 1.0, {"output_tokens": 100})
    assert summary["cpu_ms_per_token_by_service"] == {"router 0": 10.0, "expert 0.0": 5.0, "gateway": 1.0}
    assert summary["cpu_ms_per_token"] == 16.0
    assert summary["busy_fraction"] == 0.8 and summary["steal_fraction"] == 0.1
    report = _report([("cluster-2", {32: 100.0})])
    report["configs"][0]["runs"][0] |= summary
    assert "| cluster-2 | 32 | expert 0.0 5.0, gateway 1.0, router 0 10.0 | 0.8 |" in render(report, [])


def test_a_repeat_fraction_repeats_exactly_that_share_of_requests():
    from bench.workload import mixed_workload

    fresh = mixed_workload(64, 1000, seed=3)
    half = mixed_workload(64, 1000, seed=3, repeat_fraction=0.5)
    assert len({tuple(r.prompt_ids) for r in fresh}) == 64
    assert len({tuple(r.prompt_ids) for r in half}) == 32
    assert half == mixed_workload(64, 1000, seed=3, repeat_fraction=0.5)
    assert mixed_workload(64, 1000, seed=3, repeat_fraction=0.25) != half
