"""The router's Prometheus metrics (names and meanings in docs/metrics.md).

Hot-path numbers that would otherwise mean dozens of labelled increments per step (tokens per
(layer, expert), balancedness) live in tensors and are turned into samples only when Prometheus
scrapes, by collectors; everything else is a plain prometheus_client metric.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from moe_core.config import MoeConfig
from moe_core.forward import ExpertCall, ExpertHandle
from moe_core.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from router_service.engine.engine import RequestOutput
from router_service.engine.scheduler import ScheduledStep
from router_service.engine.sequence import Sequence
from router_service.expert_backend import ExpertBackend, WrappedBackend


class RoutingStats(Collector):
    """Tokens routed per (layer, expert), cumulative and over a sliding window of steps per layer."""

    BATCH = 256  # layer steps kept before they are counted

    def __init__(self, cfg: MoeConfig, window: int = 1024, per_expert: bool = True):
        self.layers, self.per_expert, self.window = cfg.moe_layers, per_expert, window
        self.total = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int64)
        self.recent = torch.zeros(cfg.num_hidden_layers, window, cfg.num_experts, dtype=torch.int64)
        self.position = [0] * cfg.num_hidden_layers
        self.lock = threading.Lock()
        self._pending: list[tuple[int, torch.Tensor]] = []

    def record(self, layer: int, ids: torch.Tensor) -> None:
        # counted a batch at a time (at most BATCH steps late, and at every snapshot): a bincount and three
        # tensor updates per layer step cost ≈ 15 µs on the engine thread, ≈ 1 % of a token at concurrency 1
        with self.lock:
            self._pending.append((layer, ids))
            if len(self._pending) >= self.BATCH:
                self._count()

    def _count(self) -> None:
        for layer, ids in self._pending:
            counts = torch.bincount(ids.reshape(-1).cpu(), minlength=self.total.shape[1])
            self.total[layer] += counts
            self.recent[layer, self.position[layer] % self.window] = counts
            self.position[layer] += 1
        self._pending.clear()

    def snapshot(self) -> tuple[torch.Tensor, dict[int, float]]:
        """Cumulative counts [layers, experts] and balancedness (mean / max over the window) per MoE layer."""
        with self.lock:
            self._count()
            total, window = self.total.clone(), self.recent.sum(dim=1)
        balance = {layer: (window[layer].float().mean() / window[layer].max()).item()
                   for layer in self.layers if window[layer].max() > 0}
        return total, balance

    def collect(self) -> Iterator:
        total, balance = self.snapshot()
        layer_tokens = CounterMetricFamily("moe_expert_layer_tokens", "Token rows routed in each MoE layer",
                                           labels=["layer"])
        for layer in self.layers:
            layer_tokens.add_metric([str(layer)], float(total[layer].sum()))
        yield layer_tokens
        if self.per_expert:
            tokens = CounterMetricFamily("moe_expert_tokens", "Token rows routed to each expert (gate decisions)",
                                         labels=["layer", "expert"])
            for layer in self.layers:
                for expert, count in enumerate(total[layer].tolist()):
                    tokens.add_metric([str(layer), str(expert)], float(count))
            yield tokens
        gauge = GaugeMetricFamily("moe_expert_balancedness", "Mean / max tokens per expert over the recent "
                                  "window of steps (1.0 = perfectly balanced)", labels=["layer"])
        for layer, value in balance.items():
            gauge.add_metric([str(layer)], value)
        yield gauge


class RoutingRecorder(WrappedBackend):
    """Wraps the expert backend: every layer step's gate decisions are counted before dispatch."""

    def __init__(self, inner: ExpertBackend, stats: RoutingStats):
        super().__init__(inner)
        self.stats = stats

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        self.stats.record(layer, ids)
        return self.inner.forward(layer, x, weights, ids)

    def submit(self, call: ExpertCall) -> ExpertHandle:
        try:
            return self.inner.submit(call)
        finally:  # counted once the shards have their rows: the count then costs none of their time
            self.stats.record(call.layer, call.ids)


class ShardHealth(Collector):
    """Replica liveness, read from the shard map at scrape time."""

    def __init__(self, shard_map):
        self.shard_map = shard_map

    def collect(self) -> Iterator:
        up = GaugeMetricFamily("moe_replica_up", "1 when the router sends the replica traffic",
                               labels=["shard", "replica"])
        live = GaugeMetricFamily("moe_shard_live_replicas", "Live replicas of each shard (0: the shard is down)",
                                 labels=["shard"])
        for shard in self.shard_map.shards:
            for replica in list(shard.replicas):
                up.add_metric([shard.shard_id, replica.address], 1.0 if replica.live else 0.0)
            live.add_metric([shard.shard_id], float(sum(r.live for r in shard.replicas)))
        yield up
        yield live


class DispatchMetrics:
    """Per shard call: latency, rows and errors by shard and replica; per layer step: dispatch time."""

    def __init__(self, registry: CollectorRegistry):
        self.shard_tokens = Counter("moe_shard_tokens", "Token rows sent to each shard", ["shard"], registry=registry)
        self.replica_tokens = Counter("moe_replica_tokens", "Token rows sent to each replica", ["shard", "replica"],
                                      registry=registry)
        self.rpc_duration = Histogram("moe_shard_rpc_duration_seconds", "One shard call, send to reply",
                                      ["shard", "replica"], buckets=LATENCY_BUCKETS, registry=registry)
        self.rpc_errors = Counter("moe_shard_rpc_errors", "Failed shard calls by gRPC status code",
                                  ["shard", "replica", "code"], registry=registry)
        self.dispatch = Histogram("moe_dispatch_duration_seconds", "One layer step's expert dispatch",
                                  buckets=LATENCY_BUCKETS, registry=registry)
        # labelled children, looked up once: `labels()` costs microseconds, and a layer step observes a few
        self._replica: dict[tuple[str, str], tuple[Histogram, Counter]] = {}
        self._shard: dict[str, Counter] = {}

    def replica_children(self, shard: str, replica: str) -> tuple[Histogram, Counter]:
        """The replica's call-duration histogram and row counter."""
        children = self._replica.get((shard, replica))
        if children is None:
            children = self._replica[shard, replica] = (self.rpc_duration.labels(shard, replica),
                                                        self.replica_tokens.labels(shard, replica))
        return children

    def shard_child(self, shard: str) -> Counter:
        """The shard's row counter."""
        child = self._shard.get(shard)
        if child is None:
            child = self._shard[shard] = self.shard_tokens.labels(shard)
        return child


class EngineMetrics:
    """Request and batch metrics, fed by the engine after every step and at every finish."""

    def __init__(self, registry: CollectorRegistry):
        def hist(name: str, doc: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=registry)

        self.running = Gauge("moe_requests_running", "Sequences in the running batch", registry=registry)
        self.waiting = Gauge("moe_requests_waiting", "Sequences queued", registry=registry)
        self.ttft = hist("moe_time_to_first_token_seconds", "Arrival to first token")
        self.tpot = hist("moe_time_per_output_token_seconds", "Time per output token after the first")
        self.e2e = hist("moe_e2e_request_latency_seconds", "Arrival to finish")
        self.step_tokens = hist("moe_step_tokens", "Tokens per engine step", BATCH_BUCKETS)
        steps = Histogram("moe_step_duration_seconds", "One engine step, scheduling to outputs, by phase (prefill: "
                          "the step carries prompt tokens; decode: only decoding rows)", ["phase"],
                          buckets=LATENCY_BUCKETS, registry=registry)
        expert = Counter("moe_step_expert_seconds", "Of those steps' time, the part spent in the routed experts: "
                         "computed in this process, or dispatched to the shards and awaited", ["phase"],
                         registry=registry)
        self.step_seconds = {phase: steps.labels(phase) for phase in ("prefill", "decode")}
        self.step_expert_seconds = {phase: expert.labels(phase) for phase in ("prefill", "decode")}
        self.prompt_tokens = Counter("moe_prompt_tokens", "Prompt tokens of requests that started generating",
                                     registry=registry)
        self.generation_tokens = Counter("moe_generation_tokens", "Generated tokens", registry=registry)
        self.finished = Counter("moe_request_finished", "Finished requests by reason", ["reason"], registry=registry)
        self.kv_usage = Gauge("moe_kv_cache_usage_ratio", "Used / total KV-cache blocks", registry=registry)
        self.preemptions = Counter("moe_preemptions", "Sequences preempted for lack of KV cache", registry=registry)
        self.prefix_queries = Counter("moe_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache "
                                      "at admission", registry=registry)
        self.prefix_hits = Counter("moe_prefix_cache_hit_tokens", "Prompt tokens whose KV blocks came from the "
                                   "prefix cache (their prefill skipped)", registry=registry)
        drafts = Counter("moe_draft_tokens", "Draft tokens of repeated requests verified, by whether they were "
                         "right (kept: a decode step saved) or not", ["result"], registry=registry)
        self.drafts_accepted, self.drafts_rejected = drafts.labels("accepted"), drafts.labels("rejected")
        self._preempted_seen = self._queried_seen = self._hit_seen = 0
        self._proposed_seen = self._accepted_seen = 0

    def on_step(self, engine, scheduled: ScheduledStep, outputs: list[RequestOutput]) -> None:
        self.step_tokens.observe(scheduled.num_tokens)
        phase = "prefill" if scheduled.prefills else "decode"
        self.step_seconds[phase].observe(engine.last_step_seconds)
        self.step_expert_seconds[phase].inc(engine.last_step_expert_seconds)
        self.generation_tokens.inc(sum(len(out.token_ids) for out in outputs))
        for out in outputs:
            if out.completion_tokens == len(out.token_ids):  # prefill just completed (not again after a preemption)
                self.prompt_tokens.inc(out.prompt_tokens)
        if engine.drafts is not None and scheduled.drafts:
            proposed, accepted = engine.drafts.proposed, engine.drafts.accepted
            self.drafts_accepted.inc(accepted - self._accepted_seen)
            self.drafts_rejected.inc(proposed - accepted - (self._proposed_seen - self._accepted_seen))
            self._proposed_seen, self._accepted_seen = proposed, accepted
        self.observe_queue(engine)

    def observe_queue(self, engine) -> None:
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_usage.set(1.0 - engine.allocator.num_free / max(engine.allocator.num_blocks, 1))
        preempted = engine.scheduler.num_preemptions
        if preempted > self._preempted_seen:
            self.preemptions.inc(preempted - self._preempted_seen)
            self._preempted_seen = preempted
        scheduler = engine.scheduler
        self.prefix_queries.inc(scheduler.prefix_query_tokens - self._queried_seen)
        self.prefix_hits.inc(scheduler.prefix_hit_tokens - self._hit_seen)
        self._queried_seen, self._hit_seen = scheduler.prefix_query_tokens, scheduler.prefix_hit_tokens

    def on_finish(self, seq: Sequence, reason: str) -> None:
        now = time.monotonic()
        self.finished.labels(reason).inc()
        self.e2e.observe(now - seq.arrival)
        if seq.first_token_time is not None:
            self.ttft.observe(seq.first_token_time - seq.arrival)
            if len(seq.output_ids) > 1:
                self.tpot.observe((now - seq.first_token_time) / (len(seq.output_ids) - 1))


def new_registry() -> CollectorRegistry:
    """A registry per service instance (tests run several in one process), with the process metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry
