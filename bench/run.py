"""`moe-serve bench`: serving configurations side by side on one workload, in one run.

    moe-serve bench --preset bench-s --configs local cluster-2 --concurrency 1 32

For each configuration: start it (`moe-serve up`), warm it up, drive it at each concurrency with the
same seeded workload, and record output tokens/s, request/s, TTFT, TPOT, ITL, E2E (p50/p90/p99),
peak RSS per service and the router's per-layer dispatch time. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.baselines import run_transformers, start_llama_server
from bench.configs import CONFIGS, parse_name, start, steal_seconds
from bench.driver import run_load, summarize
from bench.models import PRESETS, make_bench_model
from bench.workload import mixed_workload
from moe_core.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench-s", choices=sorted(PRESETS))
    p.add_argument("--model", type=Path, help="benchmark this model folder instead of a preset")
    p.add_argument("--configs", nargs="+", default=["local", "cluster-2"], type=_config_name,
                   help=f"moe-serve configurations ({', '.join(sorted(CONFIGS))}; CONFIG@NAME=VALUE,... runs one "
                        f"with extra environment) and outside references ({', '.join(EXTERNAL)})")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per run (at concurrency 1: a quarter)")
    p.add_argument("--prompt-range", type=int, nargs=2, default=[32, 512])
    p.add_argument("--output-range", type=int, nargs=2, default=[16, 128])
    p.add_argument("--repeat-fraction", type=float, default=0.0, help="share of requests repeating a prompt")
    p.add_argument("--choices", type=int, default=1,
                   help="completions per request (OpenAI's n), every one of its tokens counted; our configs only")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("bench/out"))
    p.add_argument("--out", type=Path, help="JSON result file (default: WORK_DIR/bench-<time>.json)")
    p.add_argument("--placement", type=Path, help="placement file of the cluster-placement configuration")
    p.add_argument("--up-flag", action="append", default=[], help="extra flag for `moe-serve up` (repeatable)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for the *-cache-redis configs")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of configurations this many times, interleaved (A B A B), so each ratio "
                        "is measured side by side in every round and the report gives its spread")


def _config_name(name: str) -> str:
    if name not in EXTERNAL:
        try:
            parse_name(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


EXTERNAL = ["transformers", "llamacpp-f32", "llamacpp-bf16"]


def level_seed(args: argparse.Namespace, concurrency: int) -> int:
    """Each level draws its own prompts: one server runs every level in turn, and the same prompts
    again would meet the prefix cache of the level before."""
    return args.seed + 1000 * concurrency


def level_workload(args: argparse.Namespace, vocab: int, concurrency: int) -> list:
    """The requests of one concurrency level (a quarter of them, at least 8, at concurrency 1)."""
    return mixed_workload(args.requests if concurrency > 1 else max(8, args.requests // 4), vocab,
                          level_seed(args, concurrency), tuple(args.prompt_range), tuple(args.output_range),
                          args.repeat_fraction)


def warm_up(args: argparse.Namespace, model: Path) -> list:
    """Two requests of their own seed: prompts the measured workload never sends, so no cache hit comes from them."""
    return mixed_workload(2, load_config(model).vocab_size, args.seed + 1, tuple(args.prompt_range),
                          tuple(args.output_range))


def bench_external(name: str, model: Path, args, workloads: dict[int, list]) -> dict:
    runs, rss = [], {}
    for concurrency, requests in workloads.items():
        if name == "transformers":
            dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            results, wall = run_transformers(model, requests, concurrency, dtype)
        else:
            context = max(len(r.prompt_ids) + r.max_tokens for r in requests) + 16
            server = start_llama_server(args.work_dir / "llama.cpp", model, name.split("-")[1], concurrency, context)
            try:
                asyncio.run(run_load(server.url, "gguf", warm_up(args, model), 1))
                with tqdm(total=len(requests), desc=f"{name} c={concurrency}", leave=False) as bar:
                    results, wall = asyncio.run(run_load(server.url, "gguf", requests, concurrency, bar))
                rss = server.peak_rss_mib()
            finally:
                server.stop()
        summary = summarize(results, wall) | {"concurrency": concurrency}
        runs.append(summary)
        print(json.dumps({"config": name, "concurrency": concurrency, "output_tok_s": summary["output_tok_s"],
                          "ttft_p50_ms": summary["ttft_ms"]["p50"]}), flush=True)
    return {"config": name, "runs": runs, "peak_rss_mib": rss}


def cpu_summary(before: dict[str, float], after: dict[str, float], steal: float, wall: float, summary: dict) -> dict:
    """The services' CPU time per output token, in all and by service; the share of the machine's core-seconds
    they used (below 1: cores idle, or given to others) and the share the hypervisor stole meanwhile."""
    tokens, cores = summary["output_tokens"], os.cpu_count() or 1
    used = {name: after[name] - before.get(name, 0.0) for name in after}
    cpu = sum(used.values())
    return {"cpu_ms_per_token": round(1e3 * cpu / tokens, 2) if tokens else None,
            "cpu_ms_per_token_by_service": {name: round(1e3 * s / tokens, 2) for name, s in used.items()}
            if tokens else {},
            "busy_fraction": round(cpu / (wall * cores), 3) if wall else None,
            "steal_fraction": round(steal / (wall * cores), 3) if wall else None}


def cache_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """Expert-cache rows skipped per lookup, prompt tokens whose prefill the prefix cache skipped, and
    repeat-draft tokens kept (each one a decode step a repeated request did not take) or not."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    hits = delta.get("local:hit", 0) + delta.get("local:shared", 0) + delta.get("redis:hit", 0)  # rows not computed
    lookups = delta.get("local:hit", 0) + delta.get("local:shared", 0) + delta.get("local:miss", 0)
    queried, reused = delta.pop("prefix:query", 0), delta.pop("prefix:hit", 0)
    kept, wrong = delta.pop("draft:accepted", 0), delta.pop("draft:rejected", 0)
    return {"lookups": int(lookups), "hit_rate": round(hits / lookups, 4) if lookups else None,
            **{key: int(value) for key, value in delta.items()},
            "prefix_query_tokens": int(queried), "prefix_hit_tokens": int(reused),
            "prefix_hit_rate": round(reused / queried, 4) if queried else None,
            "draft_tokens_kept": int(kept), "draft_tokens_wrong": int(wrong)}


def bench_config(name: str, model: Path, args, workloads: dict[int, list]) -> dict:
    if name in EXTERNAL:
        return bench_external(name, model, args, workloads)
    run_dir = args.work_dir / "runs" / name.replace("@", "_").replace(",", "_")
    extra = list(args.up_flag)
    if parse_name(name)[0] == "cluster-placement":
        if not args.placement:
            raise SystemExit("the cluster-placement configuration needs --placement FILE")
        extra += ["--placement", str(args.placement.resolve())]
    running = start(name, model, run_dir, args.dtype, extra, redis_url=args.redis_url)
    try:
        model_name = model.resolve().name
        asyncio.run(run_load(running.url, model_name, warm_up(args, model), 1, choices=args.choices))
        before, cache_before = running.dispatch(), running.cache_counts()
        runs = []
        for concurrency, requests in workloads.items():
            cpu, steal = running.cpu_seconds(), steal_seconds()
            with tqdm(total=len(requests), desc=f"{name} c={concurrency}", leave=False) as bar:
                results, wall = asyncio.run(run_load(running.url, model_name, requests, concurrency, bar,
                                                     choices=args.choices))
            after = running.dispatch()
            summary = summarize(results, wall) | {"concurrency": concurrency}
            summary |= cpu_summary(cpu, running.cpu_seconds(), steal_seconds() - steal, wall, summary)
            calls = after.calls - before.calls
            if calls:
                seconds = after.seconds - before.seconds
                compute = after.shard_compute_seconds - before.shard_compute_seconds
                summary["dispatch_ms_per_layer"] = round(1e3 * seconds / calls, 3)
                summary["dispatch_overhead_ms_per_layer"] = round(1e3 * (seconds - compute) / calls, 3)
            before = after
            cache_after = running.cache_counts()
            if cache_after:
                summary["cache"] = cache_summary(cache_before, cache_after)
                cache_before = cache_after
            runs.append(summary)
            print(json.dumps({"config": name, **{k: summary[k] for k in ("concurrency", "output_tok_s", "errors")},
                              "ttft_p50_ms": summary["ttft_ms"]["p50"]}), flush=True)
        return {"config": name, "runs": runs, "peak_rss_mib": running.peak_rss_mib()}
    finally:
        running.stop()


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.choices < 1 or (args.choices > 1 and set(args.configs) & set(EXTERNAL)):
        raise SystemExit("--choices must be at least 1, and 1 with transformers or llama.cpp (no `n` there)")
    model = args.model or make_bench_model(args.preset, args.work_dir / "models" / args.preset)
    cfg = load_config(model)
    workloads = {c: level_workload(args, cfg.vocab_size, c) for c in sorted(args.concurrency)}
    report = {"preset": None if args.model else args.preset, "model": str(model), "dtype": args.dtype,
              "git": _revision(), "machine": f"{platform.machine()} {platform.processor()} cores={_cores()}",
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "workload": {
                  "requests": args.requests, "prompt_range": args.prompt_range, "output_range": args.output_range,
                  "repeat_fraction": args.repeat_fraction, "choices": args.choices, "seed": args.seed,
                  "level_seeds": {c: level_seed(args, c) for c in sorted(args.concurrency)}},
              "rounds": args.rounds, "configs": [bench_config(name, model, args, workloads) | {"round": r}
                                                 for r in range(1, args.rounds + 1) for name in args.configs]}
    out = args.out or args.work_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for config in report["configs"]:
        xs = [r["concurrency"] for r in config["runs"]]
        label = config["config"] + (f" (round {config['round']})" if report.get("rounds", 1) > 1 else "")
        tput.plot(xs, [r["output_tok_s"] for r in config["runs"]], marker="o", label=label)
        ttft.plot(xs, [r["ttft_ms"]["p50"] for r in config["runs"]], marker="o", label=label)
    for axis, label in ((tput, "output tokens/s"), (ttft, "TTFT p50 (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"{report.get('preset') or report['model']} ({report['dtype']}, git {report['git']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
