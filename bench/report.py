"""Markdown tables from `moe-serve bench` JSON, for bench/RESULTS.md.

    python -m bench.report bench/results/final.json [--ratios local:cluster-2 ...]

One row per (configuration, concurrency): throughput, latency percentiles, dispatch time and the
expert- and prefix-cache hit rates where measured, the services' CPU time per output token (with
the share of the cores the hypervisor stole meanwhile); then peak RSS per service; then any requested
ratios of output tokens/s (B over A, same concurrency, same run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell(value: object) -> str:
    return "–" if value is None else str(value)


def runs_table(report: dict) -> list[str]:
    lines = ["| config | conc. | req | err | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p99 ms | ITL p50 ms "
             "| E2E p50/p99 ms | dispatch ms/layer (overhead) | cache hit rate | prefix hit rate "
             "| CPU ms/token (steal) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in report["configs"]:
        for run in config["runs"]:
            ttft, tpot, itl, e2e = run["ttft_ms"], run["tpot_ms"], run["itl_ms"], run["e2e_ms"]
            dispatch = None
            if "dispatch_ms_per_layer" in run:
                dispatch = f"{run['dispatch_ms_per_layer']} ({run['dispatch_overhead_ms_per_layer']})"
            cache = run.get("cache", {}).get("hit_rate")
            prefix = run.get("cache", {}).get("prefix_hit_rate")
            cpu = None
            if run.get("cpu_ms_per_token") is not None:
                cpu = f"{run['cpu_ms_per_token']} ({run['steal_fraction']})"
            lines.append(
                f"| {config['config']} | {run['concurrency']} | {run['requests']} | {run['errors']} "
                f"| {run['output_tok_s']} | {_cell(ttft.get('p50'))} / {_cell(ttft.get('p90'))} / "
                f"{_cell(ttft.get('p99'))} | {_cell(tpot.get('p50'))} / {_cell(tpot.get('p99'))} "
                f"| {_cell(itl.get('p50'))} | {_cell(e2e.get('p50'))} / {_cell(e2e.get('p99'))} "
                f"| {_cell(dispatch)} | {_cell(cache)} | {_cell(prefix)} | {_cell(cpu)} |")
    return lines


def rss_table(report: dict) -> list[str]:
    lines = ["| config | peak RSS MiB by service |", "|---|---|"]
    for config in report["configs"]:
        rss = ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(config.get("peak_rss_mib", {}).items()))
        lines.append(f"| {config['config']} | {rss or '–'} |")
    return lines


def ratio_lines(report: dict, pairs: list[str]) -> list[str]:
    """`A:B` → B's output tok/s over A's at each concurrency both measured."""
    by_name = {c["config"]: {r["concurrency"]: r for r in c["runs"]} for c in report["configs"]}
    lines = []
    for pair in pairs:
        base, other = pair.split(":")
        if base not in by_name or other not in by_name:
            raise SystemExit(f"{pair}: the report has no {base if base not in by_name else other}")
        shared = sorted(set(by_name[base]) & set(by_name[other]))
        parts = [f"c={c}: {by_name[other][c]['output_tok_s'] / by_name[base][c]['output_tok_s']:.2f}×"
                 for c in shared if by_name[base][c]["output_tok_s"]]
        lines.append(f"- {other} / {base} output tok/s: " + ", ".join(parts))
    return lines


def render(report: dict, pairs: list[str]) -> str:
    head = (f"{report.get('preset') or report['model']}, {report['dtype']}, git {report['git']}, "
            f"{report['machine']}, started {report['started']}, workload {json.dumps(report['workload'])}")
    return "\n".join([head, "", *runs_table(report), "", *rss_table(report), "", *ratio_lines(report, pairs)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("--ratios", nargs="*", default=[], metavar="A:B", help="B's output tok/s over A's")
    args = p.parse_args(argv)
    print(render(json.loads(args.report.read_text()), args.ratios), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
