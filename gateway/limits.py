"""Per-client limits: requests per minute (a token bucket) and requests in flight, keyed by client identity.

A client is an API key (by its digest) or, without keys, a client address. Both tables forget idle clients,
so a stream of new addresses cannot grow them without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import GatewayError, retry_after

SWEEP_EVERY_S = 60.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`rpm` requests per minute per client, with a burst of up to one minute's worth."""

    def __init__(self, rpm: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(rpm)
        self.per_second = rpm / 60.0
        self.clock = clock
        self._buckets: dict[object, _Bucket] = {}
        self._swept = clock()

    def take(self, client: object) -> float:
        """0 when the request may go ahead (a token is spent), else the seconds until a token is free."""
        now = self.clock()
        self._sweep(now)
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.per_second)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.per_second

    def _sweep(self, now: float) -> None:
        if now - self._swept < SWEEP_EVERY_S:
            return
        self._swept = now
        refill_s = self.capacity / self.per_second  # a bucket untouched this long is full: same as no bucket
        self._buckets = {c: b for c, b in self._buckets.items() if now - b.updated < refill_s}

    def __len__(self) -> int:
        return len(self._buckets)


class ClientLimits:
    """Admission for one request of a client: the rate limit, then the in-flight limit (0 turns either off)."""

    def __init__(self, rpm: int, max_in_flight: int, clock: Callable[[], float] = time.monotonic):
        self.rate = RateLimiter(rpm, clock) if rpm > 0 else None
        self.max_in_flight = max_in_flight
        self._in_flight: dict[object, int] = {}

    def admit(self, client: object) -> None:
        """Count the request in, or raise a 429 with `Retry-After`; every admit needs a `release`."""
        if self.max_in_flight and self._in_flight.get(client, 0) >= self.max_in_flight:
            raise GatewayError(429, f"Too many concurrent requests: at most {self.max_in_flight} may be in "
                                    "flight at once; wait for one to finish.", headers=retry_after(1))
        wait_s = self.rate.take(client) if self.rate is not None else 0.0
        if self.rate is not None and wait_s > 0:
            headers = retry_after(wait_s)
            raise GatewayError(429, f"Rate limit reached: at most {int(self.rate.capacity)} requests per minute; "
                                    f"retry in {headers['Retry-After']} s.", headers=headers)
        if self.max_in_flight:
            self._in_flight[client] = self._in_flight.get(client, 0) + 1

    def release(self, client: object) -> None:
        if not self.max_in_flight:
            return
        left = self._in_flight.get(client, 0) - 1
        if left > 0:
            self._in_flight[client] = left
        else:
            self._in_flight.pop(client, None)

    def in_flight(self, client: object) -> int:
        return self._in_flight.get(client, 0)
