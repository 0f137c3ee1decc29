"""Real service processes for integration tests, started on free ports and torn down afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from moe_core.placement import ShardSpec, write_placement
from moe_serve.launcher import ProcessGroup, Service
from moe_serve.ports import free_port
from tests.conftest import need_tool


@contextlib.contextmanager
def moe_serve_up(model: Path, run_dir: Path) -> Iterator[tuple[dict, subprocess.Popen]]:
    """`moe-serve up` with 2 shards on free ports, as a user runs it; yields (cluster.json, the process)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moe_serve.cli", "up", "--model", str(model), "--shards", "2", "--port", "0",
         "--run-dir", str(run_dir), "--dtype", "float32", "--device", "cpu", "--kv-cache-mib", "64"],
        stdout=(run_dir / "up.out").open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    cluster_file = run_dir / "cluster.json"
    deadline = time.monotonic() + 180
    try:
        while not cluster_file.exists():  # a separate process: nothing to wait on but its file
            assert process.poll() is None, (run_dir / "up.out").read_text()
            assert time.monotonic() < deadline, "cluster did not come up"
            time.sleep(0.2)
        yield json.loads(cluster_file.read_text()), process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


class Cluster:
    """Processes of one test: expert replicas, routers, gateways. Logs go to files in `run_dir`."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.log = (run_dir / "all.log").open("w")
        self.group = ProcessGroup(run_dir, out=self.log, color=False)

    def _start(self, name: str, role: str, module: str, flags: list[str], **info) -> Service:
        ready = self.run_dir / f"{name.replace(' ', '-')}.ready"
        argv = [sys.executable, "-m", module, *flags, "--ready-file", str(ready)]
        return self.group.start(Service(name, role, argv, ready, info))

    def expert(self, model: Path, spec: ShardSpec, replica: int, port: int = 0, threads: int = 1,
               extra: list[str] | None = None) -> Service:
        placement = self.run_dir / "placement.json"
        if not placement.exists():
            raise RuntimeError("write the placement first (Cluster.placement)")
        return self._start(f"expert {spec.shard_id}.{replica}", "expert", "expert_service",
                           ["--model", str(model), "--placement", str(placement), "--shard-id", spec.shard_id,
                            "--port", str(port), "--data-port", "0", "--metrics-port", "0", "--dtype", "float32",
                            "--device", "cpu", "--threads", str(threads), "--drain-grace-s", "0.2", *(extra or [])],
                           shard=spec.shard_id, replica=replica)

    def placement(self, specs: list[ShardSpec]) -> Path:
        path = self.run_dir / "placement.json"
        write_placement(path, specs)
        return path

    def router(self, model: Path, shards: dict[str, list[Service]] | None, *extra: str,
               name: str = "router") -> Service:
        flags = ["--model", str(model), "--port", "0", "--metrics-port", "0", "--dtype", "float32", "--device", "cpu",
                 "--kv-cache-mib", "64", "--health-interval-s", "0.2", *extra]
        if shards is None:
            flags += ["--experts", "local"]
        for shard_id, replicas in (shards or {}).items():
            flags += ["--shard", f"{shard_id}=" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)]
        return self._start(name, "router", "router_service", flags)

    def gateway(self, model: Path, routers: list[Service], *extra: str) -> Service:
        flags = ["--model", str(model), "--port", "0", *extra]
        for router in routers:
            flags += ["--router", f"127.0.0.1:{router.port}"]
        return self._start("gateway", "gateway", "gateway", flags)

    def wait(self, *services: Service, timeout: float = 120.0) -> None:
        self.group.wait_ready(list(services), timeout)

    def stop(self) -> None:
        self.group.stop()
        self.log.close()


class RedisServer:
    """A private redis-server: tests stop and restart it, so never the machine's shared one."""

    def __init__(self):
        self.binary = need_tool("redis-server")
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--maxmemory", "64mb",
                                         "--maxmemory-policy", "allkeys-lru"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
