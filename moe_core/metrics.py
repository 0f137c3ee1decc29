"""Prometheus helpers every service shares: bucket sets and the /metrics HTTP endpoint.

Metric names and meanings are documented in docs/metrics.md.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)
disable_created_metrics()  # no `_created` twin of every counter and histogram: half the series, no loss

# 1 ms .. 10 min: token latencies (ITL, TPOT) through whole requests.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
# Powers of two: rows per expert call, tokens per step.
BATCH_BUCKETS = tuple(float(2**i) for i in range(14))


def serve_metrics(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> int | None:
    """Serve /metrics on host:port (0: a free port; negative: disabled). Returns the bound port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    log.info("metrics at http://%s:%d/metrics", host, bound)
    return bound
