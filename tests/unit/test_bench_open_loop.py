"""`moe-serve bench --request-rate`: seeded arrivals, an open loop that does not wait for replies, and its report."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import statistics

import pytest

import bench.run
from bench.driver import in_flight, run_open_loop, summarize
from bench.report import open_loop_table, ratio_lines, render
from bench.workload import Level, Request, arrival_times
from tests.unit.gateway_fakes import SLOW_CHUNK_S, Harness


def test_arrivals_are_seeded_and_have_the_rate_asked_for():
    times = arrival_times(4000, 8.0, seed=1)
    assert times == arrival_times(4000, 8.0, seed=1) and times != arrival_times(4000, 8.0, seed=2)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0 and min(gaps) >= 0
    assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: the spread equals the mean
    bursty, even = (arrival_times(4000, 8.0, seed=1, burstiness=b) for b in (0.25, 4.0))
    spread = [statistics.stdev([b - a for a, b in itertools.pairwise(t)]) for t in (bursty, even)]
    assert spread[0] > 1.5 / 8 > 0.75 / 8 > spread[1]  # gamma shape k: the spread is mean / sqrt(k)
    assert arrival_times(5, math.inf, seed=1) == [0.0] * 5
    with pytest.raises(ValueError, match="rate > 0"):
        arrival_times(5, 0.0, seed=1)


@pytest.fixture(scope="module")
def harness(demo_model):
    with Harness(demo_model) as h:
        yield h


def _slow_requests(harness: Harness, n: int) -> list[Request]:
    """Requests the fake router answers a chunk per SLOW_CHUNK_S: each stays in flight for 3 of them."""
    prompt = harness.tokenizer.encode("#slow", add_special_tokens=False)
    return [Request([*prompt, 100 + i], 3) for i in range(n)]


def test_an_open_loop_sends_at_the_arrival_times_whatever_is_in_flight(harness: Harness):
    requests = _slow_requests(harness, 5)
    arrivals = [0.0, 0.02, 0.04, 0.06, 0.08]  # all five due while the first still streams
    results, wall = asyncio.run(run_open_loop(harness.url, "demo", requests, arrivals))
    assert all(r.error is None and r.output_tokens == 3 for r in results)
    assert all(r.sent >= due for r, due in zip(results, arrivals, strict=True))  # never early
    assert [r.late for r in results] == [max(0.0, r.sent - due) for r, due in zip(results, arrivals, strict=True)]
    assert in_flight(results, wall)["max"] == 5  # nobody waited for a reply
    assert wall >= 3 * SLOW_CHUNK_S
    assert summarize(results, wall)["in_flight"]["max"] == 5


def test_the_in_flight_cap_makes_later_arrivals_wait_and_counts_the_wait_as_late(harness: Harness):
    requests = _slow_requests(harness, 3)
    results, wall = asyncio.run(run_open_loop(harness.url, "demo", requests, [0.0, 0.0, 0.0], max_concurrency=1))
    assert all(r.error is None for r in results)
    assert in_flight(results, wall)["max"] == 1
    starts = sorted(r.sent for r in results)
    ends = sorted(r.sent + r.e2e for r in results)
    assert all(start >= end for start, end in zip(starts[1:], ends, strict=False))  # one after another
    assert sorted(r.late for r in results)[1:] == pytest.approx(starts[1:])  # due at 0, sent when a slot freed
    with pytest.raises(ValueError, match="2 arrival times"):
        asyncio.run(run_open_loop(harness.url, "demo", requests, [0.0, 0.0]))


def _run(level: dict, tok_s: float) -> dict:
    stats = {"p50": 1.0, "p90": 2.0, "p99": 3.0}
    return {**level, "requests": 4, "errors": 0, "output_tok_s": tok_s, "req_s": 0.5, "ttft_ms": stats,
            "tpot_ms": stats, "itl_ms": stats, "e2e_ms": stats, "in_flight": {"mean": 1.5, "max": 3}}


def test_the_report_keeps_open_loop_levels_apart_from_concurrencies():
    rate = {"concurrency": None, "request_rate": 2.0, "burstiness": 1.0, "max_concurrency": None,
            "late_ms": {"p50": 0.4, "p90": 0.9, "p99": 1.2}}
    burst = {**rate, "request_rate": "inf"}
    report = {"preset": "bench-s", "model": "m", "dtype": "float32", "git": "abc", "machine": "x", "started": "now",
              "workload": {}, "configs": [
                  {"config": "local", "runs": [_run({"concurrency": 2}, 40.0), _run(rate, 30.0), _run(burst, 50.0)]},
                  {"config": "cluster-2", "runs": [_run({"concurrency": 2}, 20.0), _run(rate, 27.0),
                                                   _run(burst, 40.0)]}]}
    assert Level.of_run(rate) == Level(rate=2.0) and Level.of_run(burst) == Level(rate=math.inf)
    assert ratio_lines(report, ["local:cluster-2"]) == [
        "- cluster-2 / local output tok/s: c=2: 0.50×, 2 req/s: 0.90×, inf req/s: 0.80×"]
    assert "| local | 2 req/s | 0.5 | 0.4 / 1.2 | 1.5 / 3 |" in open_loop_table(report)
    table = render(report, [])
    assert "| cluster-2 | 2 req/s | 4 | 0 | 27.0 |" in table and "| cluster-2 | 2 | 4 | 0 | 20.0 |" in table


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.run.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_levels_run_concurrencies_then_rates_and_each_draws_its_own_prompts():
    assert bench.run.levels(_args()) == [Level(concurrency=c) for c in (1, 8, 32)]
    assert bench.run.levels(_args("--request-rate", "4", "1")) == [Level(rate=1.0), Level(rate=4.0)]
    both = bench.run.levels(_args("--concurrency", "8", "--request-rate", "2", "inf"))
    assert both == [Level(concurrency=8), Level(rate=2.0), Level(rate=math.inf)]
    args = _args("--concurrency", "8", "--request-rate", "8")
    seeds = {bench.run.level_seed(args, level) for level in bench.run.levels(args)}
    assert len(seeds) == 2
    workloads = [bench.run.level_workload(args, 1000, level) for level in bench.run.levels(args)]
    assert workloads[0] != workloads[1] and len(workloads[1]) == args.requests
    fields = bench.run.level_fields(Level(rate=math.inf), args, [])
    assert fields["request_rate"] == "inf" and fields["concurrency"] is None  # JSON has no infinity
    for bad in (["--request-rate", "0"], ["--burstiness", "0", "--request-rate", "1"], ["--max-concurrency", "0"]):
        with pytest.raises(SystemExit):
            bench.run.levels(_args(*bad))
