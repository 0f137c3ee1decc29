"""Serving the app with uvicorn on a socket we bind ourselves, so that port 0 works and the real port is known."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import uvicorn

log = logging.getLogger("gateway")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GatewayServer(uvicorn.Server):
    """uvicorn that reports when it listens, drains on SIGTERM, and then exits cleanly.

    Draining: the first SIGTERM calls `on_drain` (the app's /readyz turns 503) and the server keeps serving,
    new requests included, for `drain_grace_s` so that load balancers notice; then it stops accepting and
    uvicorn's graceful shutdown waits up to `timeout_graceful_shutdown` for the requests in flight. SIGINT
    (Ctrl-C: a person, not a load balancer) skips the grace; a second signal ends the grace at once, and a
    second SIGINT during the wait abandons it.

    Stock uvicorn re-raises a caught SIGTERM after its graceful shutdown, which kills the process with the
    signal before our own cleanup (closing channels, removing the ready file) can run.
    """

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None,
                 on_drain: Callable[[], None] | None = None, drain_grace_s: float = 0.0):
        super().__init__(config)
        self._on_started = on_started
        self._on_drain = on_drain
        self.drain_grace_s = drain_grace_s
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:
            super().handle_exit(sig, frame)  # stop accepting now; a second SIGINT abandons in-flight requests
            return
        self.draining = True
        if self._on_drain is not None:
            self._on_drain()
        grace = self.drain_grace_s if sig == signal.SIGTERM else 0.0
        log.info("draining: /readyz answers 503; still accepting requests for %.1f s, then waiting up to "
                 "%s s for those in flight", grace, self.config.timeout_graceful_shutdown)
        if grace > 0:
            asyncio.get_running_loop().call_later(grace, self._stop_accepting)
        else:
            self._stop_accepting()

    def _stop_accepting(self) -> None:
        self.should_exit = True  # uvicorn's shutdown: close the listener, then wait for requests in flight

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only (tests serve from a background thread)
            return
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one, see `getsockname()`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host.strip("[]"), port), family=family)


def write_ready_file(path: Path, port: int) -> None:
    """Write {"port", "pid"} as JSON so that a reader sees either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        json.dump({"port": port, "pid": os.getpid()}, out)
    os.replace(tmp, path)
