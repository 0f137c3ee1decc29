"""Local processes for `moe-serve up`: start a service, stream its prefixed logs, wait until it is
ready (it writes a ready file with its port), and stop everything cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from moe_core.errors import MoeServeError
from moe_core.lifecycle import PARENT_ENV

COLORS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m"]
RESET = "\033[0m"


class LaunchError(MoeServeError):
    """A service did not start (it exited, or never became ready)."""


@dataclass
class Service:
    name: str  # e.g. "expert 0.1", used as the log prefix
    role: str  # gateway | router | expert
    argv: list[str]
    ready_file: Path
    info: dict[str, Any] = field(default_factory=dict)  # shard, replica, ...
    process: subprocess.Popen | None = None
    ready: dict[str, Any] | None = None
    log_tail: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.ready["port"]) if self.ready else 0


class ProcessGroup:
    def __init__(self, run_dir: Path, out: IO[str] = sys.stdout, color: bool | None = None):
        self.run_dir = run_dir
        self.out = out
        self.color = out.isatty() if color is None else color
        self.services: list[Service] = []
        self._print_lock = threading.Lock()

    def start(self, service: Service, env: dict[str, str] | None = None) -> Service:
        service.ready_file.unlink(missing_ok=True)
        log_path = self.run_dir / f"{service.name.replace(' ', '-')}.log"
        service.process = subprocess.Popen(
            service.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid()), **(env or {})})
        color = COLORS[len(self.services) % len(COLORS)] if self.color else ""
        threading.Thread(target=self._pump, args=(service, log_path, color), daemon=True).start()
        self.services.append(service)
        return service

    def adopt(self, service: Service, process: subprocess.Popen) -> None:
        """Supervise and stop a process started elsewhere (its output already goes to its own log)."""
        service.process = process
        self.services.append(service)

    def _pump(self, service: Service, log_path: Path, color: str) -> None:
        prefix = f"{color}{service.name:>12} |{RESET if color else ''} "
        with log_path.open("w") as log:
            for line in service.process.stdout:
                log.write(line)
                log.flush()
                service.log_tail = ([*service.log_tail, line.rstrip()])[-20:]
                with self._print_lock:
                    self.out.write(prefix + line)
                    self.out.flush()

    def wait_ready(self, services: list[Service], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            for service in list(pending):
                if service.process.poll() is not None:
                    tail = "\n    ".join(service.log_tail[-10:])
                    raise LaunchError(f"{service.name} exited with status {service.process.returncode}:\n    {tail}")
                if service.ready_file.exists():
                    service.ready = json.loads(service.ready_file.read_text())
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                raise LaunchError(f"not ready after {timeout:.0f}s: {', '.join(s.name for s in pending)}")
            if pending:
                time.sleep(0.1)

    def first_exit(self) -> Service | None:
        return next((s for s in self.services if s.process and s.process.poll() is not None), None)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM in reverse start order (gateway first, experts last), then SIGKILL stragglers."""
        for service in reversed(self.services):
            if service.process and service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in reversed(self.services):
            if service.process is None:
                continue
            try:
                service.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
