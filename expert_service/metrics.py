"""The expert service's Prometheus metrics (names and meanings in docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from expert_service.shard import ExpertShard
from moe_core.metrics import BATCH_BUCKETS, LATENCY_BUCKETS


class ShardTokens(Collector):
    """Rows computed per (layer, expert), read from the shard's counters at scrape time."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard

    def collect(self) -> Iterator:
        family = CounterMetricFamily("moe_expert_shard_tokens", "Token rows computed per expert",
                                     labels=["layer", "expert"])
        rows = [list(layer) for layer in self.shard.rows]
        for layer, held in sorted(self.shard.experts.items()):
            for expert in held.expert_ids:
                family.add_metric([str(layer), str(expert)], float(rows[layer][expert]))
        yield family


class ExpertMetrics:
    def __init__(self, shard: ExpertShard, per_expert: bool = True):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        if per_expert:
            self.registry.register(ShardTokens(shard))
        self.forward = Histogram("moe_expert_forward_duration_seconds", "Compute of one request (a layer step)",
                                 ["layer"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rows = Histogram("moe_expert_batch_rows", "Token rows per request", buckets=BATCH_BUCKETS,
                              registry=self.registry)
        self.requests = Counter("moe_expert_requests", "Requests by outcome", ["code"], registry=self.registry)
