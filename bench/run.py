"""`moe-serve bench`: serving configurations side by side on one workload, in one run.

    moe-serve bench --preset bench-s --configs local cluster-2 --concurrency 1 32
    moe-serve bench --preset bench-s --configs local cluster-2 --request-rate 1 2 4   # open loop

For each configuration: start it (`moe-serve up`), warm it up, drive it at each load level with the
same seeded workload (a fixed concurrency, or an open loop of seeded arrivals at a request rate), and
record output tokens/s, request/s, TTFT, TPOT, ITL, E2E (p50/p90/p99), requests in flight, peak RSS
per service and the router's per-layer dispatch time. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.baselines import run_transformers, start_llama_server
from bench.configs import CONFIGS, parse_name, start, steal_seconds
from bench.driver import percentiles, run_load, run_open_loop, summarize
from bench.models import PRESETS, make_bench_model
from bench.workload import Level, arrival_times, mixed_workload
from moe_core.config import load_config
from moe_core.dtypes import describe_device, resolve_device
from moe_core.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench-s", choices=sorted(PRESETS))
    p.add_argument("--model", type=Path, help="benchmark this model folder instead of a preset")
    p.add_argument("--configs", nargs="+", default=["local", "cluster-2"], type=_config_name,
                   help=f"moe-serve configurations ({', '.join(sorted(CONFIGS))}; CONFIG@NAME=VALUE,... runs one "
                        f"with extra environment) and outside references ({', '.join(EXTERNAL)})")
    p.add_argument("--concurrency", type=int, nargs="+",
                   help="closed-loop levels: requests kept in flight (default 1 8 32, unless --request-rate is given)")
    p.add_argument("--request-rate", type=float, nargs="+", default=[],
                   help="open-loop levels: requests per second, sent at seeded arrival times whatever is in flight "
                        "(inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="open loop: shape of the gamma-distributed gaps between arrivals (1: Poisson; below: burstier)")
    p.add_argument("--max-concurrency", type=int,
                   help="open loop: at most this many requests in flight; later arrivals wait, and that wait counts "
                        "as late (default: no cap)")
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
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto: where every configuration's services and transformers run")
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


def levels(args: argparse.Namespace) -> list[Level]:
    """The load levels to run, closed loops first: --concurrency (1 8 32 when neither option is given),
    then --request-rate."""
    concurrency = args.concurrency if args.concurrency is not None else ([] if args.request_rate else [1, 8, 32])
    if any(c < 1 for c in concurrency) or any(not r > 0 for r in args.request_rate):
        raise SystemExit("--concurrency levels must be at least 1 and --request-rate levels above 0")
    if args.burstiness <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise SystemExit("--burstiness must be above 0 and --max-concurrency at least 1")
    closed = [Level(concurrency=c) for c in sorted(set(concurrency))]
    return closed + [Level(rate=r) for r in sorted(set(args.request_rate))]


def level_seed(args: argparse.Namespace, level: Level) -> int:
    """Each level draws its own prompts: one server runs every level in turn, and the same prompts
    again would meet the prefix cache of the level before."""
    if level.rate is not None:
        return args.seed + 1_000_000 + round(1000 * min(level.rate, 1e6))
    return args.seed + 1000 * level.concurrency


def level_workload(args: argparse.Namespace, vocab: int, level: Level) -> list:
    """The requests of one level (a quarter of them, at least 8, at concurrency 1)."""
    return mixed_workload(args.requests if level.concurrency != 1 else max(8, args.requests // 4), vocab,
                          level_seed(args, level), tuple(args.prompt_range), tuple(args.output_range),
                          args.repeat_fraction)


def drive(url: str, model_name: str, requests: list, level: Level, args, progress, choices: int = 1) -> tuple:
    """Send one level's requests: at a fixed concurrency, or at its seeded arrival times; -> (results, wall)."""
    if level.rate is None:
        return asyncio.run(run_load(url, model_name, requests, level.concurrency, progress, choices=choices))
    arrivals = arrival_times(len(requests), level.rate, level_seed(args, level), args.burstiness)
    return asyncio.run(run_open_loop(url, model_name, requests, arrivals, args.max_concurrency, progress,
                                     choices=choices))


def level_fields(level: Level, args, results: list) -> dict:
    """What a run records of its level: the concurrency, or the offered rate, the arrivals' shape, the cap,
    and how late the requests went out against their arrival times."""
    if level.rate is None:
        return {"concurrency": level.concurrency}
    rate = level.rate if math.isfinite(level.rate) else "inf"  # JSON has no infinity
    return {"concurrency": None, "request_rate": rate, "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency, "late_ms": percentiles([r.late for r in results])}


def warm_up(args: argparse.Namespace, model: Path) -> list:
    """Two requests of their own seed: prompts the measured workload never sends, so no cache hit comes from them."""
    return mixed_workload(2, load_config(model).vocab_size, args.seed + 1, tuple(args.prompt_range),
                          tuple(args.output_range))


def bench_external(name: str, model: Path, args, workloads: dict[Level, list]) -> dict:
    runs, rss = [], {}
    for level, requests in workloads.items():
        if name == "transformers":
            if level.rate is not None:  # generate() is a batch call, not a server: nothing arrives at it
                print(f"transformers: no open-loop level ({level.short} skipped)", flush=True)
                continue
            dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            results, wall = run_transformers(model, requests, level.concurrency, dtype, resolve_device(args.device))
        else:
            context = max(len(r.prompt_ids) + r.max_tokens for r in requests) + 16
            # an open loop may have every request in flight: a slot for each, unless capped
            slots = level.concurrency or args.max_concurrency or len(requests)
            server = start_llama_server(args.work_dir / "llama.cpp", model, name.split("-")[1], slots, context)
            try:
                asyncio.run(run_load(server.url, "gguf", warm_up(args, model), 1))
                with tqdm(total=len(requests), desc=f"{name} {level.short}", leave=False) as bar:
                    results, wall = drive(server.url, "gguf", requests, level, args, bar)
                rss = server.peak_rss_mib()
            finally:
                server.stop()
        summary = summarize(results, wall) | level_fields(level, args, results)
        runs.append(summary)
        print(json.dumps({"config": name, "level": level.short, "output_tok_s": summary["output_tok_s"],
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


def step_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """A level's engine steps by phase: how many, their mean wall time and the part of it in the routed experts
    (computed in the router, or dispatched and awaited). The rest is the router's own work: attention, norms,
    gates, LM head, sampling, scheduling."""
    out = {}
    for phase in ("decode", "prefill"):
        steps = after.get(f"{phase}:steps", 0.0) - before.get(f"{phase}:steps", 0.0)
        seconds = after.get(f"{phase}:seconds", 0.0) - before.get(f"{phase}:seconds", 0.0)
        expert = after.get(f"{phase}:expert_seconds", 0.0) - before.get(f"{phase}:expert_seconds", 0.0)
        out[phase] = {"steps": int(steps), "seconds": round(seconds, 3),
                      "ms_per_step": round(1e3 * seconds / steps, 2) if steps else None,
                      "expert_ms_per_step": round(1e3 * expert / steps, 2) if steps else None}
    return out


def bench_config(name: str, model: Path, args, workloads: dict[Level, list]) -> dict:
    if name in EXTERNAL:
        return bench_external(name, model, args, workloads)
    run_dir = args.work_dir / "runs" / name.replace("@", "_").replace(",", "_")
    extra = ["--device", args.device, *args.up_flag]
    if parse_name(name)[0] == "cluster-placement":
        if not args.placement:
            raise SystemExit("the cluster-placement configuration needs --placement FILE")
        extra += ["--placement", str(args.placement.resolve())]
    running = start(name, model, run_dir, args.dtype, extra, redis_url=args.redis_url)
    try:
        model_name = model.resolve().name
        asyncio.run(run_load(running.url, model_name, warm_up(args, model), 1, choices=args.choices))
        before, cache_before, steps_before = running.dispatch(), running.cache_counts(), running.step_counts()
        runs = []
        for level, requests in workloads.items():
            cpu, steal = running.cpu_seconds(), steal_seconds()
            with tqdm(total=len(requests), desc=f"{name} {level.short}", leave=False) as bar:
                results, wall = drive(running.url, model_name, requests, level, args, bar, choices=args.choices)
            after = running.dispatch()
            summary = summarize(results, wall) | level_fields(level, args, results)
            summary |= cpu_summary(cpu, running.cpu_seconds(), steal_seconds() - steal, wall, summary)
            calls = after.calls - before.calls
            if calls:
                seconds = after.seconds - before.seconds
                compute = after.shard_compute_seconds - before.shard_compute_seconds
                summary["dispatch_ms_per_layer"] = round(1e3 * seconds / calls, 3)
                summary["dispatch_overhead_ms_per_layer"] = round(1e3 * (seconds - compute) / calls, 3)
            before = after
            steps_after = running.step_counts()
            summary["steps"] = step_summary(steps_before, steps_after)
            steps_before = steps_after
            cache_after = running.cache_counts()
            if cache_after:
                summary["cache"] = cache_summary(cache_before, cache_after)
                cache_before = cache_after
            runs.append(summary)
            print(json.dumps({"config": name, "level": level.short,
                              **{k: summary[k] for k in ("output_tok_s", "errors")},
                              "ttft_p50_ms": summary["ttft_ms"]["p50"]}), flush=True)
        return {"config": name, "runs": runs, "peak_rss_mib": running.peak_rss_mib()}
    finally:
        running.stop()


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.choices < 1 or (args.choices > 1 and set(args.configs) & set(EXTERNAL)):
        raise SystemExit("--choices must be at least 1, and 1 with transformers or llama.cpp (no `n` there)")
    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    if device != "cpu" and any(name.startswith("llamacpp") for name in args.configs):
        raise SystemExit("llama.cpp is built here for the CPU: compare it with --device cpu")
    model = args.model or make_bench_model(args.preset, args.work_dir / "models" / args.preset)
    cfg = load_config(model)
    workloads = {level: level_workload(args, cfg.vocab_size, level) for level in levels(args)}
    report = {"preset": None if args.model else args.preset, "model": str(model), "dtype": args.dtype,
              "git": _revision(), "machine": f"{platform.machine()} {platform.processor()} cores={_cores()}",
              "device": describe_device(device),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "workload": {
                  "requests": args.requests, "prompt_range": args.prompt_range, "output_range": args.output_range,
                  "repeat_fraction": args.repeat_fraction, "choices": args.choices, "seed": args.seed,
                  "level_seeds": {level.label: level_seed(args, level) for level in workloads},
                  **({"burstiness": args.burstiness, "max_concurrency": args.max_concurrency}
                     if any(level.rate is not None for level in workloads) else {})},
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
    """Output tokens/s, TTFT p50 and TPOT p50 per configuration: against concurrency (closed-loop levels),
    and against the offered request rate (open-loop levels, a row of their own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for config in report["configs"] for r in config["runs"]]
    rows = [kind for kind in ("concurrency", "request_rate") if any(_x(r, kind) is not None for r in runs)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 4 * len(rows)), squeeze=False)
    for row, kind in zip(axes, rows, strict=True):
        for config in report["configs"]:
            points = [r for r in config["runs"] if _x(r, kind) is not None]
            if not points:
                continue
            label = config["config"] + (f" (round {config['round']})" if report.get("rounds", 1) > 1 else "")
            xs = [_x(r, kind) for r in points]
            for axis, metric in zip(row, ("output_tok_s", "ttft_ms", "tpot_ms"), strict=True):
                ys = [r[metric] if metric == "output_tok_s" else r[metric]["p50"] for r in points]
                axis.plot(xs, ys, marker="o", label=label)
        for axis, label in zip(row, ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrency" if kind == "concurrency" else "offered load (requests/s, open loop)")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.legend()
    on = "" if report.get("device", "cpu") == "cpu" else f", {report['device']}"
    fig.suptitle(f"{report.get('preset') or report['model']} ({report['dtype']}{on}, git {report['git']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _x(run: dict, kind: str) -> float | None:
    """The run's x on a plot of this kind of level; None for the other kind (and an infinite rate)."""
    value = run.get(kind)
    return None if value is None or value == "inf" else value
