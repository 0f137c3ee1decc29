"""The benchmark harness, on the demo model with a tiny workload: every field there and sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import render

ROOT = Path(__file__).resolve().parents[2]


def test_bench_writes_complete_results(demo_model, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "moe_serve.cli", "bench", "--model", str(demo_model), "--configs",
         "local-drafts", "cluster-2", "--concurrency", "1", "3", "--request-rate", "20", "--requests", "6",
         "--prompt-range", "8", "24", "--output-range", "4", "8", "--repeat-fraction", "0.5", "--work-dir",
         str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert {"model", "dtype", "git", "machine", "workload", "configs"} <= set(report)
    assert [c["config"] for c in report["configs"]] == ["local-drafts", "cluster-2"]
    for config in report["configs"]:
        assert [r["concurrency"] for r in config["runs"]] == [1, 3, None]
        open_loop = config["runs"][2]  # 6 requests at seeded arrival times, 20 per second
        assert open_loop["request_rate"] == 20 and open_loop["burstiness"] == 1 and open_loop["max_concurrency"] is None
        assert 0 <= open_loop["late_ms"]["p50"] <= open_loop["late_ms"]["p99"] < 1000
        assert config["peak_rss_mib"]["gateway"] > 10 and all(v > 10 for v in config["peak_rss_mib"].values())
        for run in config["runs"]:
            assert run["errors"] == 0 and run["first_error"] is None
            assert 0 < run["in_flight"]["mean"] <= run["in_flight"]["max"] <= max(run["concurrency"] or 6, 1)
            assert run["output_tokens"] >= 4 * run["requests"] and run["output_tok_s"] > 0
            for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                stats = run[metric]
                assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (metric, stats)
            assert run["ttft_ms"]["p50"] < run["e2e_ms"]["p50"]
            # half the requests repeat a prompt: their first tokens are timed apart from the others'
            assert run["ttft_repeat_ms"]["p50"] > 0 and run["ttft_fresh_ms"]["p50"] > 0
            assert run["cpu_ms_per_token"] > 0 and 0 <= run["steal_fraction"] < 1
            by_service = run["cpu_ms_per_token_by_service"]
            assert set(by_service) == set(config["peak_rss_mib"]) and by_service["gateway"] > 0
            assert abs(sum(by_service.values()) - run["cpu_ms_per_token"]) < 0.01 * len(by_service)
            assert 0 < run["busy_fraction"] <= 1.05  # CPU time of the services over the machine's core-seconds
            steps = run["steps"]  # every level admits new prompts (prefill steps) and decodes them
            for phase in ("decode", "prefill"):
                counted = steps[phase]
                assert counted["steps"] > 0 and 0 < counted["expert_ms_per_step"] < counted["ms_per_step"], phase
            prefix = run["cache"]
            assert prefix["prefix_query_tokens"] > 0 and 0 <= prefix["prefix_hit_rate"] <= 1
    # repeated prompts reuse their KV blocks (the prefix cache is on by default)
    assert any(r["cache"]["prefix_hit_tokens"] >= 16 for c in report["configs"] for r in c["runs"])
    # and with repeat drafts, verify the earlier output in a few steps
    assert sum(r["cache"]["draft_tokens_kept"] for r in report["configs"][0]["runs"]) > 0
    assert all(r["cache"]["draft_tokens_kept"] == 0 for r in report["configs"][1]["runs"])
    cluster_runs = report["configs"][1]["runs"]
    assert all(r["dispatch_ms_per_layer"] > r["dispatch_overhead_ms_per_layer"] > 0 for r in cluster_runs)
    assert len(report["configs"][1]["peak_rss_mib"]) == 4  # gateway, router, two experts

    table = render(report, ["local-drafts:cluster-2"])
    rows = [line for line in table.splitlines() if line.startswith(("| local-drafts |", "| cluster-2 |"))]
    # runs, CPU by service, steps by phase and TTFT of repeats per (config, level); RSS and the open-loop
    # level per config
    assert len(rows) == 2 * 3 + 2 + 2 * 3 + 2 * 3 + 2 * 3 + 2
    assert "- cluster-2 / local-drafts output tok/s: c=1: " in table and "c=3: " in table and "20 req/s: " in table
    cpu_rows = [line for line in table.splitlines() if line.startswith("| cluster-2 | 3 | expert 0.0 ")]
    assert len(cpu_rows) == 1 and "router 0 " in cpu_rows[0]  # CPU per token by service


def test_dispatch_bench_measures_both_transports(demo_model, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.dispatch", "--model", str(demo_model), "--dtype", "float32", "--rows", "1", "4",
         "--steps", "20", "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["rows"], r["transport"]) for r in lines] == [(1, "data plane"), (1, "grpc"), (4, "data plane"),
                                                             (4, "grpc")]
    for r in lines:
        assert r["dispatch_ms"] > r["shard_compute_ms"] > 0 and r["overhead_ms"] > 0, r


def test_placement_bench_plans_from_the_drawn_load(demo_model, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.placement", "--model", str(demo_model), "--dtype", "float32", "--rows", "16",
         "--steps", "20", "--rounds", "1", "--skew", "1.5", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    plans = {r["placement"]: r for r in lines if "expected_busiest_over_mean" in r}
    even, plan = (max(plans[name]["expected_busiest_over_mean"].values()) for name in ("even", "plan"))
    assert 1.0 <= plan < even  # skewed routing: the plan evens out what the even split leaves lopsided
    timed = [r for r in lines if "round" in r]
    assert [(r["placement"], r["rows"]) for r in timed] == [("even", 16), ("plan", 16)]
    assert all(r["dispatch_ms"] > r["slowest_shard_ms"] > 0 for r in timed), timed


def test_bench_serves_a_planned_placement(demo_model, tmp_path):
    """`moe-serve plan`'s file through `moe-serve bench --configs cluster-placement`: a hot expert on both shards."""
    import torch

    from moe_core.balance import plan_placement
    from moe_core.config import load_config
    from moe_core.placement import write_placement

    cfg = load_config(demo_model)
    per_step = torch.full((cfg.num_hidden_layers, cfg.num_experts), 100.0)
    per_step[:, 0] = 200.0 * cfg.num_experts
    specs, _ = plan_placement(cfg, per_step, 2)
    assert all((layer, 0) in s.pairs for s in specs for layer in cfg.moe_layers)
    placement, out = tmp_path / "plan.json", tmp_path / "bench.json"
    write_placement(placement, specs)
    common = [sys.executable, "-m", "moe_serve.cli", "bench", "--model", str(demo_model), "--configs",
              "cluster-placement", "--concurrency", "2", "--requests", "4", "--prompt-range", "8", "24",
              "--output-range", "4", "8", "--work-dir", str(tmp_path), "--out", str(out)]
    result = subprocess.run([*common, "--placement", str(placement)], capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (config,) = json.loads(out.read_text())["configs"]
    (run,) = config["runs"]
    assert run["errors"] == 0 and run["output_tok_s"] > 0 and run["dispatch_ms_per_layer"] > 0
    assert len(config["peak_rss_mib"]) == 4  # gateway, router, two experts
    missing = subprocess.run(common, capture_output=True, text=True, timeout=300, check=False)
    assert missing.returncode != 0 and "needs --placement FILE" in missing.stderr


def test_device_check_script_runs_both_checks(demo_model, tmp_path):
    """bench/device_check.sh, the GPU checks' one command on a lent machine, run here on the CPU at small sizes."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none"),
           "WORK_DIR": str(tmp_path / "work"), "REQUESTS": "4", "CONFIGS": "local transformers",
           "ACCELERATOR_ARGS": "--dtype float32 --hidden 64 --ffn 96 --experts 4 --rows 1 8 --matmul-size 128 "
                               "--copy-mib 1",
           "BENCH_ARGS": f"--model {demo_model} --prompt-range 8 16 --output-range 4 8"}
    result = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "torch" in (out / "machine.txt").read_text()
    accelerator = json.loads((out / "accelerator.json").read_text())
    assert accelerator["device"] == "cpu" and len(accelerator["layers"]) == 4
    report = json.loads((out / "bench.json").read_text())
    assert report["device"] == "cpu" and [c["config"] for c in report["configs"]] == ["local", "transformers"]
    assert all(run["output_tok_s"] > 0 for c in report["configs"] for run in c["runs"])
    assert '{"config": "transformers", "level": "c=32"' in result.stdout  # the bench's lines, without its bars
    assert "== " in (out / "services.log").read_text()  # the local configuration's `up` log, for a failed run


def test_bench_refuses_a_device_this_machine_lacks(demo_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run([sys.executable, "-m", "moe_serve.cli", "bench", "--model", str(demo_model), "--device",
                             "cuda", "--configs", "local", "--work-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "CUDA is not available" in result.stderr
