"""A free TCP port for a process that binds it later (Prometheus, Redis, a container's fixed port).

A port the kernel hands out for `bind(0)` comes from the ephemeral range, the same range it draws the
source ports of outgoing connections from: between "free" and the later bind, any client connection on
the machine (a router dialling its experts, say) can take it. Ports are therefore drawn below that
range, where only listeners live, and checked to bind before they are returned."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20000  # below: registered service ports a developer machine may run (5432, 6379, 8080, 9090 ...)
TRIES = 200


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing source ports (Linux default 32768-60999; elsewhere assumed)."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.closing(socket.socket()) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and no outgoing connection will take: outside the ephemeral range
    when there is room for that, otherwise one the kernel picks."""
    low, high = ephemeral_range()
    candidates = [(LOWEST, low - 1)] if low - 1 > LOWEST else []
    if high < 65000:
        candidates.append((high + 1, 65535))
    rng = random.SystemRandom()  # concurrent test processes must not draw the same sequence
    for _ in range(TRIES if candidates else 0):
        first, last = rng.choice(candidates)
        port = rng.randint(first, last)
        if bindable(port, host):
            return port
    with contextlib.closing(socket.socket()) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
