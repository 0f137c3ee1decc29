"""Markdown tables from `moe-serve bench` JSON, for bench/RESULTS.md.

    python -m bench.report bench/results/final.json [--ratios local:cluster-2 ...]

One row per (configuration, load level: a concurrency, or an open loop's request rate): throughput,
latency percentiles, dispatch time and the expert- and prefix-cache hit rates where measured, the
services' CPU time per output token (with the share of the cores the hypervisor stole meanwhile); then
peak RSS per service; then CPU per token by service and the share of the machine's core-seconds the
services used (OpenMP's bounded spin counts as used: a share below 1 is cores idle, or given to
others); then the engine's steps by phase (decode, prefill) and their time in the routed experts; for
open-loop levels, how late the requests went out against their arrival times and how many were in
flight; then any requested ratios of output tokens/s (B over A, same level, same run).

A configuration that ran more than once (`moe-serve bench --rounds N`, or a name listed twice) has rounds
1, 2, ... in the order they ran; the report then adds each configuration's median and range over its
rounds, and a ratio is taken within each round (round i of B over round i of A, or A's last round where
A ran fewer) and given as the median of those with every round's value beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.workload import Level


def _cell(value: object) -> str:
    return "–" if value is None else str(value)


def runs_table(report: dict) -> list[str]:
    lines = ["| config | load | req | err | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p99 ms | ITL p50 ms "
             "| E2E p50/p99 ms | dispatch ms/layer (overhead) | cache hit rate | prefix hit rate "
             "| draft tokens kept | CPU ms/token (steal) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in report["configs"]:
        for run in config["runs"]:
            ttft, tpot, itl, e2e = run["ttft_ms"], run["tpot_ms"], run["itl_ms"], run["e2e_ms"]
            dispatch = None
            if "dispatch_ms_per_layer" in run:
                dispatch = f"{run['dispatch_ms_per_layer']} ({run['dispatch_overhead_ms_per_layer']})"
            cache = run.get("cache", {}).get("hit_rate")
            prefix = run.get("cache", {}).get("prefix_hit_rate")
            kept = run.get("cache", {}).get("draft_tokens_kept") or None
            cpu = None
            if run.get("cpu_ms_per_token") is not None:
                cpu = f"{run['cpu_ms_per_token']} ({run['steal_fraction']})"
            lines.append(
                f"| {config['config']} | {Level.of_run(run).label} | {run['requests']} | {run['errors']} "
                f"| {run['output_tok_s']} | {_cell(ttft.get('p50'))} / {_cell(ttft.get('p90'))} / "
                f"{_cell(ttft.get('p99'))} | {_cell(tpot.get('p50'))} / {_cell(tpot.get('p99'))} "
                f"| {_cell(itl.get('p50'))} | {_cell(e2e.get('p50'))} / {_cell(e2e.get('p99'))} "
                f"| {_cell(dispatch)} | {_cell(cache)} | {_cell(prefix)} | {_cell(kept)} | {_cell(cpu)} |")
    return lines


def rss_table(report: dict) -> list[str]:
    lines = ["| config | peak RSS MiB by service |", "|---|---|"]
    for config in report["configs"]:
        rss = ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(config.get("peak_rss_mib", {}).items()))
        lines.append(f"| {config['config']} | {rss or '–'} |")
    return lines


def cpu_table(report: dict) -> list[str]:
    """Where each run's CPU went, by service, and the share of the machine's core-seconds used in all."""
    lines = ["| config | load | CPU ms/token by service | cores busy |", "|---|---|---|---|"]
    for config in report["configs"]:
        for run in config["runs"]:
            if run.get("cpu_ms_per_token_by_service"):
                cpu = ", ".join(f"{name} {ms}" for name, ms in sorted(run["cpu_ms_per_token_by_service"].items()))
                busy = _cell(run.get("busy_fraction"))
                lines.append(f"| {config['config']} | {Level.of_run(run).label} | {cpu} | {busy} |")
    return lines if len(lines) > 2 else []


def steps_table(report: dict) -> list[str]:
    """Each run's engine steps by phase: count, mean wall time, and the part of it in the routed experts (the
    rest is the router's own work). Set side by side, two configurations show in which phase one loses."""
    lines = ["| config | load | decode steps | decode ms/step (in experts) | prefill steps "
             "| prefill ms/step (in experts) | share of step time in prefill steps |", "|---|---|---|---|---|---|---|"]
    for config in report["configs"]:
        for run in config["runs"]:
            steps = run.get("steps")
            if not steps:
                continue
            cells = []
            for phase in ("decode", "prefill"):
                s = steps[phase]
                cells += [str(s["steps"]), "–" if s["ms_per_step"] is None
                          else f"{s['ms_per_step']} ({s['expert_ms_per_step']})"]
            total = steps["decode"]["seconds"] + steps["prefill"]["seconds"]
            share = f"{steps['prefill']['seconds'] / total:.2f}" if total else "–"
            lines.append(f"| {config['config']} | {Level.of_run(run).label} | {' | '.join(cells)} | {share} |")
    return lines if len(lines) > 2 else []


def repeat_table(report: dict) -> list[str]:
    """TTFT of the requests that repeat an earlier prompt, beside the others' (workloads with repeats)."""
    lines = ["| config | load | TTFT p50 / p90 ms, repeated prompts | TTFT p50 / p90 ms, new prompts |",
             "|---|---|---|---|"]
    for config in report["configs"]:
        for run in config["runs"]:
            if "ttft_repeat_ms" in run:
                repeat, fresh = run["ttft_repeat_ms"], run["ttft_fresh_ms"]
                lines.append(f"| {config['config']} | {Level.of_run(run).label} | {_cell(repeat['p50'])} / "
                             f"{_cell(repeat['p90'])} | {_cell(fresh['p50'])} / {_cell(fresh['p90'])} |")
    return lines if len(lines) > 2 else []


def open_loop_table(report: dict) -> list[str]:
    """Open-loop levels: offered against achieved request rate, how late the requests went out against their
    arrival times (the client busy, or the in-flight cap), and how many were in flight."""
    lines = ["| config | offered | achieved req/s | late p50/p99 ms | in flight mean / max |",
             "|---|---|---|---|---|"]
    for config in report["configs"]:
        for run in config["runs"]:
            if run.get("request_rate") is not None:
                late, flight = run["late_ms"], run.get("in_flight", {})
                lines.append(f"| {config['config']} | {Level.of_run(run).label} | {run['req_s']} "
                             f"| {_cell(late.get('p50'))} / {_cell(late.get('p99'))} "
                             f"| {_cell(flight.get('mean'))} / {_cell(flight.get('max'))} |")
    return lines if len(lines) > 2 else []


def by_round(report: dict) -> dict[str, list[dict[Level, dict]]]:
    """Configuration name -> its runs by load level, one dict per round, in the order they ran."""
    rounds: dict[str, list[dict[Level, dict]]] = {}
    for config in report["configs"]:
        rounds.setdefault(config["config"], []).append({Level.of_run(r): r for r in config["runs"]})
    return rounds


def spread_table(report: dict) -> list[str]:
    """Median and range over rounds of output tok/s and TPOT p50, for configurations that ran more than once."""
    repeated = {name: rounds for name, rounds in by_round(report).items() if len(rounds) > 1}
    if not repeated:
        return []
    lines = ["| config | load | rounds | output tok/s median (min–max) | TPOT p50 ms median (min–max) |",
             "|---|---|---|---|---|"]
    for name, rounds in repeated.items():
        for c in sorted({c for runs in rounds for c in runs}, key=Level.sort_key):
            runs = [r[c] for r in rounds if c in r]
            tput = [r["output_tok_s"] for r in runs]
            tpot = [r["tpot_ms"]["p50"] for r in runs if r["tpot_ms"].get("p50") is not None]
            lines.append(f"| {name} | {c.label} | {len(runs)} | {_spread(tput)} | {_spread(tpot) if tpot else '–'} |")
    return lines


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def _split_pair(pair: str, configs) -> tuple[str, str]:
    """`A:B` at the colon that leaves two configurations of the report (a name may hold one, e.g.
    `cluster-2@PYTHONPATH=/a:/b`)."""
    cuts = [i for i, char in enumerate(pair) if char == ":"]
    for i in cuts:
        if pair[:i] in configs and pair[i + 1:] in configs:
            return pair[:i], pair[i + 1:]
    base, _, other = pair.partition(":") if cuts else (pair, "", "")
    raise SystemExit(f"{pair}: the report has no {base if base not in configs else other or 'second configuration'}")


def ratio_lines(report: dict, pairs: list[str]) -> list[str]:
    """`A:B` → B's output tok/s over A's at each level both measured, within each round."""
    rounds = by_round(report)
    lines = []
    for pair in pairs:
        base, other = _split_pair(pair, rounds)
        parts = []
        shared = {c for runs in rounds[other] for c in runs} & {c for runs in rounds[base] for c in runs}
        for c in sorted(shared, key=Level.sort_key):
            ratios = []
            for i, runs in enumerate(rounds[other]):
                against = rounds[base][min(i, len(rounds[base]) - 1)]
                if c in runs and c in against and against[c]["output_tok_s"]:
                    ratios.append(runs[c]["output_tok_s"] / against[c]["output_tok_s"])
            if len(ratios) == 1:
                parts.append(f"{c.short}: {ratios[0]:.2f}×")
            elif ratios:
                each = ", ".join(f"{r:.2f}" for r in ratios)
                parts.append(f"{c.short}: {statistics.median(ratios):.2f}× (rounds {each})")
        lines.append(f"- {other} / {base} output tok/s: " + ", ".join(parts))
    return lines


def render(report: dict, pairs: list[str]) -> str:
    head = (f"{report.get('preset') or report['model']}, {report['dtype']}, git {report['git']}, "
            f"{report['machine']}, device {report.get('device', 'cpu')}, started {report['started']}, "
            f"workload {json.dumps(report['workload'])}")
    tables = [runs_table(report), rss_table(report), cpu_table(report), steps_table(report), repeat_table(report),
              open_loop_table(report), spread_table(report)]
    return "\n".join([head, "", *(line for table in tables if table for line in [*table, ""]),
                      *ratio_lines(report, pairs)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("--ratios", nargs="*", default=[], metavar="A:B", help="B's output tok/s over A's")
    args = p.parse_args(argv)
    print(render(json.loads(args.report.read_text()), args.ratios), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
