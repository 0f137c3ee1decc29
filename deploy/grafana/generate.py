"""Writes the Grafana dashboards in deploy/grafana/dashboards/ (the JSON files are committed; edit this
file and run `python deploy/grafana/generate.py`; `--check` fails when a committed file is stale).

Every panel reads the `datasource` variable (a Prometheus data source, by default the provisioned
one with uid `moe-prometheus`), so the dashboards work provisioned (docker-compose) and imported by
hand into any Grafana. Metric names and labels: docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS_UID = "moe-prometheus"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
P50_P99 = (("p50", 0.5), ("p99", 0.99))
P99 = (("p99", 0.99),)


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> dict[str, Any]:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "range": not instant,
         "instant": instant, "editorMode": "code"}
    if table:
        t["format"] = "table"
    return t


def quantiles(metric: str, by: tuple[str, ...] = (), legend: str = "", sel: str = "",
              qs=QUANTILES) -> list[dict[str, Any]]:
    """p50/p90/p99 of a histogram, summed over instances (and split `by` some labels)."""
    labels = ", ".join(("le", *by))
    return [target(f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket{sel}{RATE})))",
                   f"{name} {legend}".strip()) for name, q in qs]


def panel(kind: str, title: str, targets: list[dict[str, Any]], *, w: int = 12, h: int = 8, unit: str = "short",
          description: str = "", options: dict[str, Any] | None = None, field: dict[str, Any] | None = None,
          transformations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "gridPos": {"w": w, "h": h},
         "fieldConfig": {"defaults": {"unit": unit, **(field or {})}, "overrides": []},
         "options": options or {}, "targets": [{"refId": chr(ord("A") + i), **t} for i, t in enumerate(targets)]}
    if transformations:
        p["transformations"] = transformations
    return p


def timeseries(title: str, targets, **kw) -> dict[str, Any]:
    kw.setdefault("options", {"legend": {"displayMode": "list", "placement": "bottom"},
                              "tooltip": {"mode": "multi", "sort": "desc"}})
    return panel("timeseries", title, targets, **kw)


def stat(title: str, expr: str, *, unit: str = "short", w: int = 4, h: int = 4, description: str = "",
         thresholds: list[tuple[str, float | None]] | None = None) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]
    return panel("stat", title, [target(expr, instant=True)], w=w, h=h, unit=unit, description=description,
                 options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area"},
                 field={"thresholds": {"mode": "absolute", "steps": steps}})


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def query_var(name: str, label: str, query: str) -> dict[str, Any]:
    return {"type": "query", "name": name, "label": label, "datasource": DS, "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 3, "hide": 0,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "regex": ""}


def datasource_var() -> dict[str, Any]:
    return {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": DS_UID}, "hide": 0, "refresh": 1,
            "regex": "", "options": [], "includeAll": False, "multi": False}


def custom_var(name: str, label: str, values: list[str], current: str) -> dict[str, Any]:
    return {"type": "custom", "name": name, "label": label, "query": ",".join(values), "hide": 0,
            "current": {"selected": True, "text": current, "value": current}, "includeAll": False, "multi": False,
            "options": [{"selected": v == current, "text": v, "value": v} for v in values]}


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
              panels: list[dict[str, Any]]) -> dict[str, Any]:
    """Lays panels out left to right in rows of 24 columns and numbers them."""
    x = y = line = 0
    for number, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24 or p["type"] == "row":
            x, y, line = 0, y + line, 0
        p["id"] = number
        p["gridPos"] |= {"x": x, "y": y}
        x, line = x + w, max(line, h)
    links = [{"type": "dashboards", "tags": ["moe-serve"], "asDropdown": False, "title": "moe-serve",
              "includeVars": False, "keepTime": True}]
    return {"uid": uid, "title": title, "description": description, "tags": ["moe-serve"], "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
            "timezone": "", "graphTooltip": 1, "links": links, "annotations": {"list": []},
            "templating": {"list": [datasource_var(), *variables]}, "panels": panels}


def _table_heatmap(title: str, expr: str, description: str) -> dict[str, Any]:
    """Layers as rows, experts as columns, cells coloured by value: the layers x experts heatmap."""
    return panel("table", title, [target(expr, instant=True, table=True)], w=24, h=9, description=description,
                 transformations=[{"id": "groupingToMatrix", "options": {
                     "rowField": "layer", "columnField": "expert", "valueField": "Value", "emptyValue": "zero"}}],
                 field={"custom": {"align": "center", "cellOptions": {"type": "color-background", "mode": "gradient"}},
                        "color": {"mode": "continuous-BlYlRd"}, "decimals": 0},
                 options={"showHeader": True, "cellHeight": "sm"})


def experts() -> dict[str, Any]:
    sel = '{layer=~"$layer"}'
    routed = f"sum by (layer, expert) (rate(moe_expert_tokens_total{sel}{RATE}))"
    panels = [
        row("Routing: layers x experts"),
        _table_heatmap("Tokens routed per (layer, expert) over the time range",
                       f"sum by (layer, expert) (increase(moe_expert_tokens_total{sel}[$__range]))",
                       "Token rows the gates sent to each expert (rows: layer `L`, columns: expert id), summed "
                       "over routers. Hot cells are the experts whose shards do the most work."),
        panel("heatmap", "Tokens/s per expert over time ($layer)",
              [target(f"sum by (expert) (rate(moe_expert_tokens_total{sel}{RATE}))", "{{expert}}")],
              w=24, h=9, description="Each row is an expert (summed over the selected layers); colour = token "
                                     "rows routed to it per second.",
              options={"calculate": False, "yAxis": {"axisPlacement": "left"}, "rowsFrame": {"layout": "auto"},
                       "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                       "cellGap": 1, "legend": {"show": True}, "tooltip": {"mode": "single", "yHistogram": False}}),
        row("Balance"),
        timeseries("Balancedness per layer",
                   [target(f"avg by (layer) (moe_expert_balancedness{sel})", "layer {{layer}}")], unit="percentunit",
                   description="Mean / max tokens per expert over each router's recent window (default 1024 "
                               "steps). 1.0 = every expert equally loaded; top_k / num_experts = all tokens on "
                               "the same experts. The MoeExpertImbalance alert fires below 0.4 for 10 minutes.",
                   field={"min": 0, "max": 1}),
        stat("Least balanced layer", f"min(moe_expert_balancedness{sel})", unit="percentunit", w=6, h=8,
             thresholds=[("red", None), ("orange", 0.4), ("green", 0.7)]),
        panel("bargauge", "Hottest experts ($topk, tokens/s)",
              [target(f"topk($topk, {routed})", "L{{layer}} E{{expert}}", instant=True)], w=6, h=8,
              options={"orientation": "horizontal", "displayMode": "gradient",
                       "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}),
        panel("bargauge", "Coldest experts ($topk, tokens/s)",
              [target(f"bottomk($topk, {routed})", "L{{layer}} E{{expert}}", instant=True)], w=12, h=8,
              options={"orientation": "horizontal", "displayMode": "gradient",
                       "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}),
        timeseries("Token rows routed per layer /s",
                   [target(f"sum by (layer) (rate(moe_expert_layer_tokens_total{sel}{RATE}))", "layer {{layer}}")],
                   description="(tokens through the layer) x top_k, per second; present even with "
                               "--no-per-expert-metrics."),
        row("Shards and replicas"),
        timeseries("Token rows sent per shard /s",
                   [target(f"sum by (shard) (rate(moe_shard_tokens_total{{shard=~\"$shard\"}}{RATE}))",
                           "{{shard}}")], w=8,
                   description="Router side: rows sent to each shard (a token routed to two experts of the "
                               "same shard is one row)."),
        timeseries("Token rows sent per replica /s",
                   [target("sum by (shard, replica) "
                           f"(rate(moe_replica_tokens_total{{shard=~\"$shard\"}}{RATE}))", "{{shard}} {{replica}}")],
                   w=8, description="How the router spreads a shard's rows over its replicas."),
        timeseries("Expert rows computed per shard /s",
                   [target("sum by (shard) (rate(moe_expert_shard_tokens_total"
                           f"{{job=\"expert\", shard=~\"$shard\", layer=~\"$layer\"}}{RATE}))", "{{shard}}")],
                   w=8, description="Expert side: (row, expert) pairs each shard computed, from the expert "
                                    "services' own counters (equals the routed tokens of the shard's experts)."),
    ]
    variables = [query_var("layer", "Layer", "label_values(moe_expert_balancedness, layer)"),
                 query_var("shard", "Shard", "label_values(moe_shard_live_replicas, shard)"),
                 custom_var("topk", "Top", ["5", "10", "20"], "10")]
    return dashboard("moe-experts", "moe-serve / Expert utilization",
                     "Which experts the gates pick, how balanced each layer is, and where the rows go.",
                     variables, panels)


def serving() -> dict[str, Any]:
    api = 'route=~"/v1/.*"'
    panels = [
        stat("Requests running", "sum(moe_requests_running)"),
        stat("Requests waiting", "sum(moe_requests_waiting)", thresholds=[("green", None), ("orange", 1)]),
        stat("Output tokens/s", f"sum(rate(moe_generation_tokens_total{RATE}))"),
        stat("Prompt tokens/s", f"sum(rate(moe_prompt_tokens_total{RATE}))"),
        stat("API requests/s", f"sum(rate(moe_http_requests_total{{{api}}}{RATE}))", unit="reqps"),
        stat("API 5xx ratio", f"(sum(rate(moe_http_requests_total{{{api}, status=~\"5..\"}}{RATE})) or vector(0))"
                              f" / sum(rate(moe_http_requests_total{{{api}}}{RATE}))", unit="percentunit",
             thresholds=[("green", None), ("red", 0.05)]),
        row("Load"),
        timeseries("Requests running and waiting",
                   [target("sum(moe_requests_running)", "running"), target("sum(moe_requests_waiting)", "waiting")],
                   w=8, description="Sequences (one per choice) in the routers' running batch and queue."),
        timeseries("Tokens/s", [target(f"sum(rate(moe_generation_tokens_total{RATE}))", "output"),
                                target(f"sum(rate(moe_prompt_tokens_total{RATE}))", "prompt")], w=8),
        timeseries("Tokens per engine step", quantiles("moe_step_tokens"), w=8,
                   description="Batch size in tokens (prefill chunks + one per decoding sequence)."),
        row("Latency"),
        timeseries("Time to first token", quantiles("moe_time_to_first_token_seconds"), w=8, unit="s",
                   description="Arrival at the router to first token. MoeHighTimeToFirstToken fires when p90 > 5 s "
                               "for 10 minutes."),
        timeseries("Time per output token", quantiles("moe_time_per_output_token_seconds"), w=8, unit="s"),
        timeseries("End-to-end latency", quantiles("moe_e2e_request_latency_seconds"), w=8, unit="s"),
        row("Engine steps"),
        timeseries("Engine step time by phase p50 / p99",
                   quantiles("moe_step_duration_seconds", ("phase",), "{{phase}}", qs=P50_P99), w=12, unit="s",
                   description="One engine step, scheduling to outputs. prefill: the step carries prompt tokens "
                               "(with the decoding rows beside them); decode: decoding rows only."),
        timeseries("Share of step time in the routed experts",
                   [target(f"sum by (phase) (rate(moe_step_expert_seconds_total{RATE})) / sum by (phase) "
                           f"(rate(moe_step_duration_seconds_sum{RATE}))", "{{phase}}")], w=12, unit="percentunit",
                   description="Computed in the router (one process) or dispatched to the shards and awaited; the "
                               "rest is the router's attention, gates, LM head, sampling and scheduling."),
        row("Outcomes"),
        timeseries("Finished sequences by reason /s",
                   [target(f"sum by (reason) (rate(moe_request_finished_total{RATE}))", "{{reason}}")], w=8),
        timeseries("HTTP requests by route and status /s",
                   [target(f"sum by (route, status) (rate(moe_http_requests_total{RATE}))", "{{route}} {{status}}")],
                   w=8, unit="reqps"),
        timeseries("HTTP latency p99 by route",
                   [*quantiles("moe_http_request_duration_seconds", ("route",), "{{route}}", qs=P99),
                    target("sum(moe_http_requests_in_flight)", "in flight")], w=8, unit="s",
                   field={"custom": {"axisSoftMin": 0}}),
    ]
    return dashboard("moe-serving", "moe-serve / Serving",
                     "Load, throughput, latency and outcomes of the OpenAI API and the routers' engines.",
                     [], panels)


def cluster() -> dict[str, Any]:
    sel = 'shard=~"$shard"'
    cache = "moe_expert_cache_requests_total"
    panels = [
        stat("Shards with no live replica", f"count(min by (shard) (moe_shard_live_replicas{{{sel}}}) == 0) "
                                            "or vector(0)", thresholds=[("green", None), ("red", 1)]),
        stat("Replicas out of rotation", f"count(moe_replica_up{{{sel}}} == 0) or vector(0)",
             thresholds=[("green", None), ("orange", 1)]),
        stat("Targets down", 'count(up{job=~"gateway|router|expert"} == 0) or vector(0)',
             thresholds=[("green", None), ("red", 1)]),
        stat("KV-cache usage (max)", "max(moe_kv_cache_usage_ratio)", unit="percentunit",
             thresholds=[("green", None), ("orange", 0.8), ("red", 0.95)]),
        stat("Preemptions /s", f"sum(rate(moe_preemptions_total{RATE}))"),
        # rows whose experts were skipped (a local or Redis hit, or shared in-step) per row looked up locally
        stat("Expert-cache hit ratio", f"(sum(rate({cache}{{tier=\"local\",result=~\"hit|shared\"}}{RATE})) "
             f"+ (sum(rate({cache}{{tier=\"redis\",result=\"hit\"}}{RATE})) or vector(0))) "
             f"/ sum(rate({cache}{{tier=\"local\"}}{RATE}))", unit="percentunit"),
        row("Replica health"),
        timeseries("Live replicas per shard", [target(f"min by (shard) (moe_shard_live_replicas{{{sel}}})",
                                                      "{{shard}}")], w=8,
                   description="As the routers see them (min over routers). 0 = the shard is down: MoeShardDown.",
                   field={"min": 0, "decimals": 0}),
        panel("state-timeline", "Replica up", [target(f"min by (shard, replica) (moe_replica_up{{{sel}}})",
                                                      "{{shard}} {{replica}}")], w=16,
              options={"showValue": "never", "mergeValues": True},
              field={"mappings": [{"type": "value", "options": {"0": {"text": "down", "color": "red"},
                                                                "1": {"text": "up", "color": "green"}}}]}),
        row("Expert dispatch"),
        timeseries("Shard RPC latency p50 / p99",
                   quantiles("moe_shard_rpc_duration_seconds", ("shard", "replica"), "{{shard}} {{replica}}",
                             f"{{{sel}}}", qs=P50_P99), w=8, unit="s",
                   description="One router -> shard call, send to reply."),
        timeseries("Shard RPC errors /s",
                   [target(f"sum by (shard, replica, code) (rate(moe_shard_rpc_errors_total{{{sel}}}{RATE}))"
                           f" or sum by (shard, replica) (0 * rate(moe_shard_rpc_duration_seconds_count{{{sel}}}"
                           f"{RATE}))", "{{shard}} {{replica}} {{code}}")], w=8,
                   description="Failed calls by gRPC code (a zero line per replica while there are none)."),
        timeseries("Dispatch time per layer step",
                   quantiles("moe_dispatch_duration_seconds", qs=P50_P99), w=8, unit="s",
                   description="Split to combined output, all shards of one layer step."),
        timeseries("Expert compute per request p99 by shard",
                   quantiles("moe_expert_forward_duration_seconds", ("shard",), "{{shard}}",
                             f'{{job="expert", {sel}}}', qs=P99), w=8, unit="s"),
        timeseries("Rows per expert request",
                   quantiles("moe_expert_batch_rows", sel=f'{{job="expert", {sel}}}', qs=P50_P99), w=8),
        timeseries("Expert requests by code /s",
                   [target(f"sum by (shard, code) (rate(moe_expert_requests_total{{{sel}}}{RATE}))",
                           "{{shard}} {{code}}")], w=8),
        row("Expert-output cache"),
        timeseries("Cache lookups by result /s",
                   [target(f"sum by (tier, result) (rate({cache}{RATE}))", "{{tier}} {{result}}")], w=8,
                   description="MoeExpertCacheErrors fires when more than 1% of a tier's lookups fail."),
        timeseries("Cache bytes", [target("sum by (instance, tier) (moe_expert_cache_bytes)",
                                          "{{instance}} {{tier}}")], w=8, unit="bytes"),
        timeseries("Cache lookup time p99",
                   quantiles("moe_expert_cache_lookup_duration_seconds", ("tier",), "{{tier}}", qs=P99),
                   w=8, unit="s"),
        timeseries("Prefix cache: prompt tokens /s",
                   [target(f"sum(rate(moe_prefix_cache_query_tokens_total{RATE}))", "looked up"),
                    target(f"sum(rate(moe_prefix_cache_hit_tokens_total{RATE}))", "reused (prefill skipped)")],
                   w=8, description="Prompt tokens whose KV blocks a router already had: their prefill, dense "
                                    "part and experts, is skipped."),
        timeseries("Repeat drafts: tokens /s",
                   [target(f"sum by (result) (rate(moe_draft_tokens_total{RATE}))", "{{result}}")], w=8,
                   description="Draft tokens of repeated requests verified (--draft-tokens): each accepted one is "
                               "a decode step a repeat did not take."),
        row("Processes"),
        timeseries("Resident memory", [target('sum by (job, instance) (process_resident_memory_bytes'
                                              '{job=~"gateway|router|expert"})', "{{job}} {{instance}}")],
                   w=8, unit="bytes"),
        timeseries("CPU", [target('sum by (job, instance) (rate(process_cpu_seconds_total'
                                  f'{{job=~"gateway|router|expert"}}{RATE}))', "{{job}} {{instance}}")],
                   w=8, unit="percentunit", description="Cores busy (1.0 = one core)."),
        timeseries("KV-cache usage per router",
                   [target("max by (instance) (moe_kv_cache_usage_ratio)", "{{instance}}")], w=8, unit="percentunit",
                   description="Used / total KV-cache blocks; near 1.0 the router preempts sequences (see the "
                               "Preemptions stat).", field={"min": 0, "max": 1}),
    ]
    return dashboard("moe-cluster", "moe-serve / Cluster",
                     "Shard and replica health, expert dispatch, the expert-output cache and the processes.",
                     [query_var("shard", "Shard", "label_values(moe_shard_live_replicas, shard)")], panels)


DASHBOARDS = {"expert-utilization.json": experts, "serving.json": serving, "cluster.json": cluster}


def render() -> dict[str, str]:
    return {name: json.dumps(make(), indent=2) + "\n" for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed dashboard differs")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)} (run python deploy/grafana/generate.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
