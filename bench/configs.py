"""The serving configurations a benchmark compares, each started as a real `moe-serve up` cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from moe_core.pb import router_pb2, router_pb2_grpc

# name -> extra `moe-serve up` flags
CONFIGS = {
    "local": ["--shards", "0"],  # one process: experts inside the router (plus the gateway)
    "cluster-2": ["--shards", "2"],
    "cluster-2x2": ["--shards", "2", "--replicas", "2"],
    "cluster-2-ffn": ["--shards", "2", "--split", "ffn"],  # half of every expert's FFN per shard
    "cluster-2-layers": ["--shards", "2", "--split", "layers"],  # whole layers per shard
    "cluster-placement": [],  # the shards of `moe-serve bench --placement FILE` (e.g. one `moe-serve plan` wrote)
    # the local tier sized to hold a whole run (warm-up plus 64 requests write ~300 MiB of rows)
    "cluster-2-cache-local": ["--shards", "2", "--cache", "local", "--router-arg=--cache-local-mib=1024"],
    "cluster-2-cache-redis": ["--shards", "2", "--cache", "redis", "--router-arg=--cache-local-mib=1024"],
    # two routers behind the gateway (requests spread over them): a repeat often lands on the router that
    # did not serve the first one, where only a cache shared through Redis can help
    "cluster-2-routers-2": ["--shards", "2", "--routers", "2"],
    "cluster-2-routers-2-cache-redis": ["--shards", "2", "--routers", "2", "--cache", "redis",
                                        "--router-arg=--cache-local-mib=1024"],
    # + --redis URL and a fresh key prefix per run
    # repeat drafts (router_service/engine/drafts.py): a repeated request verifies the earlier output 8 tokens a step
    "local-drafts": ["--shards", "0", "--draft-tokens", "8"],
    "cluster-2-drafts": ["--shards", "2", "--draft-tokens", "8"],
    "cluster-2-cache-local-drafts": ["--shards", "2", "--cache", "local", "--router-arg=--cache-local-mib=1024",
                                     "--draft-tokens", "8"],
}


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """"cluster-2@MOE_SPLIT_ROWS=0,NAME=V" -> ("cluster-2", {...}): a configuration run with extra
    environment for all its processes, so an A/B of a setting runs side by side in one benchmark."""
    base, _, assignments = name.partition("@")
    env = {}
    for item in filter(None, assignments.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{name!r}: expected CONFIG@NAME=VALUE[,NAME=VALUE...]")
        env[key] = value
    if base not in CONFIGS:
        raise ValueError(f"{name!r}: unknown configuration {base!r} (known: {', '.join(sorted(CONFIGS))})")
    return base, env


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    cluster: dict
    redis_pid: int | None = None  # the Redis server of a *-redis configuration, when it runs on this machine

    @property
    def url(self) -> str:
        return self.cluster["url"]

    @property
    def routers(self) -> list[dict]:
        return [s for s in self.cluster["services"] if s["role"] == "router"]

    def dispatch(self) -> router_pb2.DispatchStats:
        """Dispatch counters summed over the routers."""
        total = router_pb2.DispatchStats()
        for router in self.routers:
            with grpc.insecure_channel(f"127.0.0.1:{router['port']}") as channel:
                stub = router_pb2_grpc.RouterServiceStub(channel)
                stats = stub.GetClusterStatus(router_pb2.ClusterStatusRequest(), timeout=10).dispatch
            total.calls += stats.calls
            total.seconds += stats.seconds
            total.shard_compute_seconds += stats.shard_compute_seconds
            total.retries += stats.retries
        return total

    def cache_counts(self) -> dict[str, float]:
        """Expert-cache lookups, prefix-cache tokens and repeat-draft tokens so far, summed over the routers,
        as {"local:hit": n, "redis:error": n, ..., "prefix:query": n, "prefix:hit": n, "draft:accepted": n, ...}."""
        counts: dict[str, float] = {}
        for family, sample in self._router_samples():
            if not sample.name.endswith("_total"):
                continue
            if family == "moe_expert_cache_requests":
                key = f"{sample.labels['tier']}:{sample.labels['result']}"
            elif family in ("moe_prefix_cache_query_tokens", "moe_prefix_cache_hit_tokens"):
                key = f"prefix:{family.split('_')[-2]}"
            elif family == "moe_draft_tokens":
                key = f"draft:{sample.labels['result']}"
            else:
                continue
            counts[key] = counts.get(key, 0.0) + sample.value
        return counts

    def step_counts(self) -> dict[str, float]:
        """Engine steps so far, summed over the routers, by phase: {"decode:steps": n, "decode:seconds": s,
        "decode:expert_seconds": s, "prefill:steps": n, ...} (the router's `moe_step_duration_seconds` and
        `moe_step_expert_seconds_total`)."""
        counts: dict[str, float] = {}
        names = {"moe_step_duration_seconds_count": "steps", "moe_step_duration_seconds_sum": "seconds",
                 "moe_step_expert_seconds_total": "expert_seconds"}
        for _, sample in self._router_samples():
            if sample.name in names:
                key = f"{sample.labels['phase']}:{names[sample.name]}"
                counts[key] = counts.get(key, 0.0) + sample.value
        return counts

    def _router_samples(self):
        """(metric family name, sample) of every router's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        for router in self.routers:
            for family in text_string_to_metric_families(httpx.get(router["metrics_url"], timeout=10).text):
                for sample in family.samples:
                    yield family.name, sample

    def peak_rss_mib(self) -> dict[str, float]:
        """Peak resident memory (VmHWM) of every service, by name."""
        out = {}
        for service in self.cluster["services"]:
            try:
                status = Path(f"/proc/{service['pid']}/status").read_text()
            except OSError:
                continue
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            out[service["name"]] = round(kib / 1024, 1)
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """User plus system CPU time of each service so far, by name: unlike wall time, what a change
        costs in work, whatever else the machine does (bench/RESULTS.md; these machines are shared)."""
        used = {service["name"]: process_cpu_seconds(service["pid"]) for service in self.cluster["services"]}
        if self.redis_pid is not None:  # on the same cores, its work on the cache's writes is the cache's cost too
            used["redis-server"] = process_cpu_seconds(self.redis_pid)
        return used

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others, all cores (0 where the kernel does not count it)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def start(name: str, model: Path, run_dir: Path, dtype: str, extra: list[str] | None = None,
          timeout: float = 600, redis_url: str | None = None) -> Running:
    base, extra_env = parse_name(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster_file = run_dir / "cluster.json"
    cluster_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "moe_serve.cli", "up", "--model", str(model), "--port", "0", "--run-dir",
            str(run_dir), "--dtype", dtype, "--kv-cache-mib", "2048", *CONFIGS[base], *(extra or [])]
    if base.endswith("redis"):  # a key prefix of its own, so no earlier run's entries count as hits
        argv += ["--redis", redis_url or "redis://127.0.0.1:6379/0",
                 f"--router-arg=--cache-prefix=bench{time.time_ns()}"]
    log = (run_dir / "up.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not cluster_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{name} did not start; see {run_dir / 'up.log'}")
        time.sleep(0.2)
    return Running(name, process, json.loads(cluster_file.read_text()),
                   local_redis_pid(redis_url or "redis://127.0.0.1:6379/0") if base.endswith("redis") else None)


def local_redis_pid(url: str) -> int | None:
    """The process id of the Redis server at `url` if it runs on this machine (its /proc entry is a Redis)."""
    import redis

    try:
        pid = int(redis.Redis.from_url(url, socket_timeout=5).info("server")["process_id"])
        return pid if "redis" in Path(f"/proc/{pid}/comm").read_text() else None
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None
