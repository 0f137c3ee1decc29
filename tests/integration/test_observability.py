"""Observability end to end on `moe-serve up` (2 shards, demo model): the services' metrics count exactly
what the requests did, and a real Prometheus scraping the cluster under load answers every query of
every Grafana dashboard, evaluates every alert rule, and feeds the expert-utilization heatmap."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_core.config import load_config
from moe_core.placement import load_placement, uncovered
from moe_serve import cli
from moe_serve.plan import load_from_prometheus
from moe_serve.prometheus import start_prometheus, stop_prometheus
from tests.conftest import need_tool
from tests.integration.services import moe_serve_up
from tests.unit.test_dashboards import DASHBOARD_FILES, load, panel_queries, variable_queries

ROOT = Path(__file__).resolve().parents[2]
N = 4  # completion requests of the exact-count test
# Panels that may be empty, and why: the expert-output cache is not part of this cluster yet. The test
# still runs their queries (they must be valid) and wants data from them once the metric exists.
EXPECTED_EMPTY = {
    "Expert-cache hit ratio": "no expert-output cache configured: moe_expert_cache_requests_total absent",
    "Cache lookups by result /s": "no expert-output cache configured: moe_expert_cache_requests_total absent",
    "Cache bytes": "no expert-output cache configured: moe_expert_cache_bytes absent",
    "Cache lookup time p99": "no expert-output cache configured: moe_expert_cache_lookup_duration_seconds absent",
}
Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def up(demo_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("observability")
    with moe_serve_up(demo_model, run_dir) as (cluster, _):
        yield cluster, run_dir

def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def scrape(url: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text)
            for s in family.samples if not s.name.endswith("_created")}


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def scrape_all(cluster: dict) -> dict[str, Any]:
    services = cluster["services"]
    (router,) = [s for s in services if s["role"] == "router"]
    (gateway,) = [s for s in services if s["role"] == "gateway"]
    experts = {s["shard"]: scrape(s["metrics_url"]) for s in services if s["role"] == "expert"}
    return {"router": scrape(router["metrics_url"]), "gateway": scrape(gateway["metrics_url"]), "experts": experts}


def per_expert(samples: Samples, name: str, layers: int, experts: int) -> list[list[float]]:
    return [[value(samples, name, layer=str(layer), expert=str(e)) for e in range(experts)] for layer in range(layers)]


def complete(base: str, model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        reply = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]
    usage = None
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return usage


def test_metrics_count_exactly_what_the_requests_did(up, demo_model):
    cluster, _ = up
    cfg = load_config(demo_model)
    before = scrape_all(cluster)
    prompts = ["Once upon a time", "The river ran past the mill and the boats", "A", "Where is the ship? " * 6]
    with ThreadPoolExecutor(N) as pool:
        usages = list(pool.map(lambda i: complete(cluster["url"], demo_model.resolve().name, prompts[i],
                                                  3 + 6 * i, stream=i == 1), range(N)))
    assert [u["completion_tokens"] for u in usages] == [3, 9, 15, 21]
    wait_for(lambda: value(scrape_all(cluster)["router"], "moe_request_finished_total", reason="length")
             - value(before["router"], "moe_request_finished_total", reason="length") >= N, 30, "finishes")
    after = scrape_all(cluster)
    r0, r1 = before["router"], after["router"]

    def delta(name: str, where: str = "router", **labels: str) -> float:
        return value(after[where], name, **labels) - value(before[where], name, **labels)

    # Every token but each request's last sampled one goes through every MoE layer, to top-k experts.
    routed = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for u in usages)
    assert delta("moe_expert_tokens_total") == routed * cfg.num_experts_per_tok * len(cfg.moe_layers)
    assert delta("moe_expert_layer_tokens_total") == delta("moe_expert_tokens_total")
    assert delta("moe_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("moe_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("moe_request_finished_total", reason="length") == N
    assert delta("moe_request_finished_total") == N
    for histogram in ("moe_time_to_first_token_seconds", "moe_time_per_output_token_seconds",
                      "moe_e2e_request_latency_seconds"):
        assert delta(f"{histogram}_count") == N, histogram
    # every engine step is timed under its phase, and its time in the (remote) experts is part of it
    assert delta("moe_step_duration_seconds_count") == delta("moe_step_tokens_count") > 0
    assert delta("moe_step_duration_seconds_count", phase="prefill") > 0
    assert 0 < delta("moe_step_expert_seconds_total") < delta("moe_step_duration_seconds_sum")
    assert delta("moe_http_requests_total", "gateway", route="/v1/completions", status="200") == N
    assert delta("moe_http_request_duration_seconds_count", "gateway", route="/v1/completions") == N
    assert value(r1, "moe_requests_running") == value(r1, "moe_requests_waiting") == 0
    assert r1 != r0

    # Per (layer, expert): the router's counters = /v1/experts/stats = what the shards computed.
    layers, experts = cfg.num_hidden_layers, cfg.num_experts
    router = per_expert(r1, "moe_expert_tokens_total", layers, experts)
    stats = httpx.get(cluster["url"] + "/v1/experts/stats", timeout=10).json()
    assert stats["tokens"] == router
    shards = [[sum(value(s, "moe_expert_shard_tokens_total", layer=str(layer), expert=str(e))
                   for s in after["experts"].values()) for e in range(experts)] for layer in range(layers)]
    assert shards == router
    assert [value(r1, "moe_expert_layer_tokens_total", layer=str(layer)) for layer in cfg.moe_layers] == \
        [sum(router[layer]) for layer in cfg.moe_layers]

    # Per shard: rows and calls the router sent = rows and requests the shard's service received.
    for shard, samples in after["experts"].items():
        assert value(r1, "moe_shard_tokens_total", shard=shard) == value(samples, "moe_expert_batch_rows_sum")
        assert value(r1, "moe_replica_tokens_total", shard=shard) == value(r1, "moe_shard_tokens_total", shard=shard)
        assert value(r1, "moe_shard_rpc_duration_seconds_count", shard=shard) == \
            value(samples, "moe_expert_requests_total", code="OK") == value(samples, "moe_expert_batch_rows_count")
        assert value(r1, "moe_shard_live_replicas", shard=shard) == 1
    assert value(r1, "moe_shard_rpc_errors_total") == 0
    balance = {s: v for (n, ls), v in r1.items() if n == "moe_expert_balancedness" for s in [dict(ls)["layer"]]}
    assert set(balance) == {str(layer) for layer in cfg.moe_layers}
    assert all(cfg.num_experts_per_tok / experts - 1e-6 <= v <= 1 for v in balance.values())
    assert balance == {k: pytest.approx(v) for k, v in stats["balancedness"].items()}


def test_prompt_tokens_count_at_prefill_and_once_per_choice(up, demo_model):
    """docs/metrics.md: moe_prompt_tokens_total counts when a sequence's prefill completes (not at finish),
    and a request's `n` choices are `n` sequences (so `n` prompts and `n` finishes)."""
    cluster, _ = up
    router = next(s["metrics_url"] for s in cluster["services"] if s["role"] == "router")
    model = demo_model.resolve().name
    before = scrape(router)
    reply = httpx.post(cluster["url"] + "/v1/completions", timeout=120, json={
        "model": model, "prompt": "The mill", "max_tokens": 4, "n": 2, "temperature": 0, "ignore_eos": True}).json()
    after = scrape(router)
    assert value(after, "moe_prompt_tokens_total") - value(before, "moe_prompt_tokens_total") == \
        2 * reply["usage"]["prompt_tokens"]
    assert value(after, "moe_request_finished_total") - value(before, "moe_request_finished_total") == 2

    body = {"model": model, "prompt": "Once upon a time there was a mill", "max_tokens": 256, "ignore_eos": True}

    def generating() -> Samples | None:
        now = scrape(router)
        return now if value(now, "moe_generation_tokens_total") > value(after, "moe_generation_tokens_total") else None

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, cluster["url"] + "/v1/completions", json=body, timeout=120)
        during = wait_for(generating, 60, "the first token", every=0.02)
        usage = running.result().json()["usage"]
    assert value(during, "moe_request_finished_total") == value(after, "moe_request_finished_total")
    assert value(during, "moe_prompt_tokens_total") - value(after, "moe_prompt_tokens_total") == usage["prompt_tokens"]


def test_a_requests_choices_prefill_their_prompt_once(up, demo_model):
    """n=4 over HTTP: the gateway sends the four choices to one router, where the three that find the
    first still prefilling wait for its KV blocks; every full block of the prompt is computed once."""
    cluster, _ = up
    router = next(s["metrics_url"] for s in cluster["services"] if s["role"] == "router")
    prompt = f"{time.time_ns()} a prompt nobody sent before, long enough to fill several blocks of the cache"
    before = scrape(router)
    reply = httpx.post(cluster["url"] + "/v1/completions", timeout=120, json={
        "model": demo_model.resolve().name, "prompt": prompt, "max_tokens": 2, "n": 4, "temperature": 0}).json()
    after = scrape(router)
    cached = (reply["usage"]["prompt_tokens"] - 1) // 16 * 16  # the router's 16-token blocks
    assert cached >= 32
    assert value(after, "moe_prefix_cache_hit_tokens_total") - value(before, "moe_prefix_cache_hit_tokens_total") \
        == 3 * cached
    assert sorted(choice["index"] for choice in reply["choices"]) == [0, 1, 2, 3]


def _heatmap_module():
    spec = importlib.util.spec_from_file_location("make_heatmap", ROOT / "docs" / "make_heatmap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(cluster: dict, model: str, stop: threading.Event, requests: list) -> None:
    """Mixed traffic, one request at a time (plus a 404 now and then), until `stop`."""
    i = 0
    while not stop.is_set():
        route, body = requests[i % len(requests)]
        httpx.post(cluster["url"] + route, json={**body, "model": model, "max_tokens": 8}, timeout=120)
        if i % 5 == 0:
            httpx.post(cluster["url"] + "/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=30)
        i += 1


def _query(url: str, expr: str) -> list:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    return reply["data"]["result"]


def _missing(url: str, queries: list[tuple[str, str, str]], optional: set[str]) -> list[str]:
    """Queries that return nothing (all must be valid PromQL), apart from the expected-empty panels."""
    return [f"{board}: {title} [{ref}]: {expr}" for board, title, ref, expr in queries
            if not _query(url, expr) and title not in optional]


def test_prometheus_answers_every_dashboard_query_under_load(up, tmp_path):
    need_tool("prometheus")
    cluster, run_dir = up
    heatmap = _heatmap_module()
    process, url = start_prometheus(run_dir, cluster, scrape_interval="1s")
    stop = threading.Event()
    model = Path(cluster["model"]).resolve().name
    loader = threading.Thread(target=_load, args=(cluster, model, stop, heatmap.mixed_requests(12)), daemon=True)
    loader.start()
    try:
        boards = {path.stem: load(path) for path in DASHBOARD_FILES}
        queries = [(name, *q) for name, board in boards.items() for q in panel_queries(board)]
        queries += [(name, *q) for name, board in boards.items()
                    for q in panel_queries(board, {"shard": "shard-1", "layer": "2"})]
        cache_panels = {title for _, title, _, expr in queries if "moe_expert_cache_" in expr}
        assert cache_panels == set(EXPECTED_EMPTY), "EXPECTED_EMPTY must list exactly the cache panels"
        cache_exists = bool(_query(url, 'count({__name__=~"moe_expert_cache_.*"})'))
        optional = set() if cache_exists else set(EXPECTED_EMPTY)
        wait_for(lambda: len(_query(url, 'up{job=~"gateway|router|expert"} == 1')) == 4, 60, "all 4 targets up")
        missing: list[str] = []

        def every_panel_has_data() -> bool:
            missing[:] = _missing(url, queries, optional)
            return not missing

        try:
            wait_for(every_panel_has_data, 90, "panel data", every=1.0)
        except AssertionError:
            pytest.fail("panels without data:\n  " + "\n  ".join(missing))
        for name, board in boards.items():
            for var, label, metric in variable_queries(board):
                values = httpx.get(f"{url}/api/v1/label/{label}/values", params={"match[]": metric}).json()["data"]
                assert values, f"{name}: variable ${var} has no values"
        rules = wait_for(lambda: _rules_evaluated(url), 30, "every alert rule evaluated")
        assert len(rules) == 10 and all(r["health"] == "ok" for r in rules), rules
    finally:
        stop.set()
        loader.join(180)

    # After the load: Prometheus' latest scrape holds every routed token; the heatmap shows exactly them.
    try:
        heatmap.wait_until_scraped(url, cluster["url"])
        data = heatmap.fetch(url)
        stats = httpx.get(cluster["url"] + "/v1/experts/stats", timeout=10).json()
        assert data["tokens"] == stats["tokens"] and data["layers"] == stats["moe_layers"]
        png = heatmap.render(data, tmp_path / "heatmap.png", "test")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run_dir / "grafana" / "datasources" / "moe-serve.yml").is_file()
        _plans_agree(cluster, url, stats["tokens"], tmp_path)
    finally:
        stop_prometheus(process)


def _plans_agree(cluster: dict, url: str, tokens: list[list[int]], tmp_path: Path) -> None:
    """`moe-serve plan` reads the same load from the router's /metrics and from Prometheus, and plans the same."""
    cfg = load_config(cluster["model"])
    routed, steps = load_from_prometheus(cfg, url, None, 'job="router"', 10)
    assert routed.tolist() == tokens and steps > 0
    router = next(s["metrics_url"] for s in cluster["services"] if s["role"] == "router")
    plan = ["plan", "--model", cluster["model"], "--shards", "2"]
    from_router, from_prometheus, recent = tmp_path / "router.json", tmp_path / "prometheus.json", tmp_path / "w.json"
    assert cli.main([*plan, "--metrics", router, "--out", str(from_router)]) == 0
    assert cli.main([*plan, "--prometheus", url, "--match", 'job="router"', "--out", str(from_prometheus)]) == 0
    assert from_router.read_text() == from_prometheus.read_text()
    assert uncovered(cfg, load_placement(from_router, cfg)) == []
    assert cli.main([*plan, "--prometheus", url, "--window", "10m", "--out", str(recent)]) == 0
    assert uncovered(cfg, load_placement(recent, cfg)) == []


def _rules_evaluated(url: str) -> list[dict] | None:
    groups = httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return rules if rules and all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown"
                                  for r in rules) else None
