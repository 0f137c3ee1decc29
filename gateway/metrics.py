"""The gateway's Prometheus metrics: requests by route and status, latency to the last byte, in flight, and
clients that left before their response ended.

A pure ASGI middleware (not BaseHTTPMiddleware) so that streamed responses are timed to their last
chunk and nothing buffers them.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_core.metrics import LATENCY_BUCKETS  # also turns off the `_created` series


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("moe_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.duration = Histogram("moe_http_request_duration_seconds", "Request latency to the last byte",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("moe_http_requests_in_flight", "Requests being served", registry=self.registry)
        self.disconnects = Counter("moe_http_client_disconnects", "Clients that closed the connection before "
                                   "their response ended", ["route"], registry=self.registry)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/metrics":  # scrapes are not traffic
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        self.metrics.in_flight.inc()

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            name = route_template(scope)
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.duration.labels(name).observe(time.perf_counter() - started)
            if scope.get("state", {}).get("client_disconnected"):
                self.metrics.disconnects.labels(name).inc()


def route_template(scope: Scope) -> str:
    """The path template of the request's route (never the raw path: it may hold anything), or "unmatched".

    Routing sets it; a request refused before routing (no key, rate limit) is matched here.
    """
    route = scope.get("route")
    if route is None and scope.get("app") is not None:
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", None) or "unmatched"
