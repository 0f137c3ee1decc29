"""`moe-serve plan`: a placement file from measured expert load (DESIGN §6).

Reads how many token rows the gates sent to each (layer, expert) and in how many steps — the routers'
`moe_expert_tokens_total` and `moe_step_tokens_count`, scraped from their /metrics endpoints (or saved
scrapes), or asked of Prometheus, since the routers started or over a recent window — and writes a
placement that spreads each layer's work evenly over the shards, copying hot experts to several shards
(moe_core/balance.py). The router, the expert services, `moe-serve up --placement`, docker-compose and
the Kubernetes overlays (`moe-serve deploy render`) all read the file.

    moe-serve plan --model DIR --shards 4 --metrics http://router:9400/metrics --out placement.json
    moe-serve plan --model DIR --shards 4 --prometheus http://prometheus:9090 --window 6h --out placement.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe_core.balance import EXPERT_COST, LayerPlan, expected_work, plan_placement, rows_per_step
from moe_core.config import MoeConfig, load_config
from moe_core.demo import ensure_demo_model
from moe_core.errors import ConfigError
from moe_core.placement import even_split, write_placement

METRIC = "moe_expert_tokens_total"
STEPS = "moe_step_tokens_count"  # engine steps: one layer step per MoE layer each


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (Hugging Face layout); default: the built-in demo model")
    p.add_argument("--shards", type=int, required=True, help="expert shards to place the experts on")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--metrics", action="append", metavar="URL_OR_FILE",
                        help="a router's /metrics endpoint, or a file holding one scrape (repeatable: routers add up)")
    source.add_argument("--prometheus", metavar="URL", help="Prometheus server scraping the routers")
    p.add_argument("--window", metavar="RANGE",
                   help="with --prometheus: load over this recent range (e.g. 30m, 6h) instead of the routers' "
                        "counters since they started")
    p.add_argument("--match", default="", metavar="LABELS",
                   help="with --prometheus: label matchers selecting one deployment's routers, e.g. 'job=\"router\"'")
    p.add_argument("--slots", type=int,
                   help="experts one shard may hold per layer, copies included (its memory); default: an even "
                        "split's share plus one, room for one hot expert's copy")
    p.add_argument("--expert-cost", type=float, default=EXPERT_COST, metavar="ROWS",
                   help="an expert's fixed cost whenever it runs (reading its weights), in rows' worth of work: "
                        "about 12 on CPUs, a few hundred on GPUs")
    p.add_argument("--out", type=Path, default=Path("placement.json"), help="placement file to write")
    p.add_argument("--timeout-s", type=float, default=10.0, help="HTTP timeout for each scrape or query")


def run(args: argparse.Namespace) -> int:
    if args.window and not args.prometheus:
        raise ConfigError("--window goes with --prometheus (a /metrics scrape holds totals since each router started)")
    cfg = load_config(Path(args.model) if args.model else ensure_demo_model())
    if args.prometheus:
        tokens, steps = load_from_prometheus(cfg, args.prometheus, args.window, args.match, args.timeout_s)
    else:
        scrapes = [load_from_exposition(cfg, read_scrape(source, args.timeout_s), source) for source in args.metrics]
        tokens, steps = sum(t for t, _ in scrapes), sum(n for _, n in scrapes)
    if not tokens.sum():
        raise ConfigError("the metrics count no routed tokens yet: serve some traffic first")
    per_step = rows_per_step(tokens, steps)
    specs, plans = plan_placement(cfg, per_step, args.shards, args.slots, args.expert_cost)
    write_placement(args.out, specs)
    even = expected_work(cfg, even_split(cfg, args.shards), per_step, args.expert_cost)
    print(summary(cfg, plans, even), file=sys.stderr)
    print(args.out)
    return 0


def read_scrape(source: str, timeout_s: float) -> str:
    if source.startswith(("http://", "https://")):
        try:
            response = httpx.get(source, timeout=timeout_s)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot scrape {source}: {exc}") from None
        return response.text
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read metrics file {source}: {exc.strerror}") from None


def load_from_exposition(cfg: MoeConfig, text: str, where: str) -> tuple[torch.Tensor, float]:
    """Prometheus text exposition -> ([layers, experts] routed token rows, engine steps)."""
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:
        raise ConfigError(f"{where}: not a Prometheus metrics page ({exc})") from None
    routed = [(s.labels, s.value) for s in samples if s.name == METRIC]
    if not routed:
        raise ConfigError(f"{where}: no {METRIC} samples (is it a router's /metrics, with per-expert metrics on?)")
    return _table(cfg, routed, where), sum(s.value for s in samples if s.name == STEPS)


def load_from_prometheus(cfg: MoeConfig, url: str, window: str | None, match: str, timeout_s: float
                         ) -> tuple[torch.Tensor, float]:
    def over(metric: str) -> str:
        selector = f"{metric}{{{match}}}"
        return f"increase({selector}[{window}])" if window else selector

    result = _query(url, f"sum by (layer, expert) ({over(METRIC)})", timeout_s)
    if not result:
        raise ConfigError(f"Prometheus at {url} has no {METRIC} series (are the routers scraped? is --match right?)")
    tokens = _table(cfg, [(r["metric"], float(r["value"][1])) for r in result], f"Prometheus at {url}")
    steps = _query(url, f"sum({over(STEPS)})", timeout_s)
    return tokens, float(steps[0]["value"][1]) if steps else 0.0


def _query(url: str, query: str, timeout_s: float) -> list[dict]:
    try:
        response = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=timeout_s)
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ConfigError(f"cannot query Prometheus at {url}: {exc}") from None
    if body.get("status") != "success":
        raise ConfigError(f"Prometheus at {url} refused `{query}`: {body.get('error', response.text[:200])}")
    return body["data"]["result"]


def _table(cfg: MoeConfig, samples: list[tuple[dict[str, str], float]], where: str) -> torch.Tensor:
    tokens = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.float64)
    for labels, value in samples:
        try:
            layer, expert = int(labels["layer"]), int(labels["expert"])
        except (KeyError, ValueError):
            raise ConfigError(f"{where}: {METRIC} sample without integer layer/expert labels: {labels}") from None
        if layer not in cfg.moe_layers or not 0 <= expert < cfg.num_experts:
            raise ConfigError(f"{where}: {METRIC} has (layer {layer}, expert {expert}), which this model lacks "
                              f"(MoE layers {cfg.moe_layers}, {cfg.num_experts} experts): metrics of another model?")
        if value == value and value > 0:  # NaN (an empty Prometheus window) counts as nothing routed
            tokens[layer, expert] += value
    return tokens


def summary(cfg: MoeConfig, plan: dict[int, LayerPlan], even: dict[int, LayerPlan]) -> str:
    """Per layer: the busiest shard's work over the mean, even split against the plan, and the copied experts."""
    lines = ["layer  busiest shard's work / mean: even split -> plan  copied experts (expert x copies)"]
    for layer in cfg.moe_layers:
        copied = [f"{e}x{len(h)}" for e, h in enumerate(plan[layer].holders) if len(h) > 1]
        lines.append(f"{layer:>5}  {even[layer].busiest_over_mean:>39.3f} -> {plan[layer].busiest_over_mean:.3f}  "
                     f"{' '.join(copied) or '-'}")
    worst_even = max(p.busiest_over_mean for p in even.values())
    worst_plan = max(p.busiest_over_mean for p in plan.values())
    lines.append(f"worst layer: {worst_even:.3f} -> {worst_plan:.3f}")
    return "\n".join(lines)
