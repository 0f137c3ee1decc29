"""A soak run: steady load on a 2-shard x 2-replica cluster while replicas are killed and restarted.

    python -m bench.soak --minutes 5 --concurrency 32 --kill-every 60

Every `--kill-every` seconds one expert replica (taking turns over all of them) is killed with
SIGKILL and restarted at the same address a few seconds later; the router must notice, route
around it, and take it back. Reports requests, errors (target 0), latency percentiles, and the
resident memory of every service at the start and at the end (target: growth under 10 %).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.driver import Result, _one, summarize
from bench.workload import mixed_workload
from moe_core.config import load_config
from moe_core.demo import ensure_demo_model
from moe_core.placement import write_placement
from moe_serve import up
from moe_serve.launcher import ProcessGroup, Service


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process; None once it is gone (a killed process not yet reaped has no VmRSS)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return None if kib is None else round(kib / 1024, 1)


class ReplicaEnvGroup(ProcessGroup):
    """A process group that starts every expert replica 1 with extra environment: an A/B under one load."""

    def __init__(self, *args, replica_env: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.replica_env = replica_env

    def start(self, service: Service, env: dict[str, str] | None = None) -> Service:
        if service.role == "expert" and service.info.get("replica") == 1:
            env = {**(env or {}), **self.replica_env}
        return super().start(service, env)


def start_cluster(model: Path, run_dir: Path, dtype: str, replica_env: dict[str, str]
                  ) -> tuple[ProcessGroup, list[Service], Service]:
    args = up.build_args(["--model", str(model), "--shards", "2", "--replicas", "2", "--port", "0",
                          "--run-dir", str(run_dir), "--dtype", dtype, "--router-arg=--health-interval-s=0.5"])
    group = ReplicaEnvGroup(run_dir, out=(run_dir / "soak.log").open("w"), color=False, replica_env=replica_env)
    specs = up.plan_shards(args, model)
    placement = run_dir / "placement.json"
    write_placement(placement, specs)
    experts = up.start_experts(group, args, model, specs, placement)
    group.wait_ready(experts, 300)
    for spec in specs:
        spec.replicas = [f"{args.host}:{s.port}" for s in experts if s.info["shard"] == spec.shard_id]
    write_placement(placement, specs)
    routers = up.start_routers(group, args, model, placement, len(specs))
    group.wait_ready(routers, 300)
    gateway = up.start_gateway(group, args, model, routers)
    group.wait_ready([gateway], 300)
    return group, experts, gateway


def restart(group: ProcessGroup, dead: Service) -> Service:
    argv = list(dead.argv)
    argv[argv.index("--port") + 1] = str(dead.port)  # the same address: the router knows it
    fresh = group.start(Service(dead.name, dead.role, argv, dead.ready_file, dead.info))
    group.wait_ready([fresh], 120)
    return fresh


def sample_rss(group: ProcessGroup, every: float, stop: threading.Event, samples: list) -> None:
    """RSS of every live service every `every` seconds: a leak climbs, a working set levels off."""
    while not stop.wait(every):
        rss = {s.name: rss_mib(s.process.pid) for s in group.services if s.process.poll() is None}
        samples.append({"t": round(time.time()), **{name: mib for name, mib in rss.items() if mib is not None}})


def chaos(group: ProcessGroup, experts: list[Service], every: float, stop: threading.Event, log: list) -> None:
    if every <= 0:
        return
    for index in itertools.cycle(range(len(experts))):
        if stop.wait(every):
            return
        victim = experts[index]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        log.append({"t": time.time(), "killed": victim.name})
        if stop.wait(5):
            return
        experts[index] = restart(group, victim)
        log.append({"t": time.time(), "restarted": victim.name})


async def load(url: str, model: str, vocab: int, seconds: float, concurrency: int) -> list[Result]:
    workload = itertools.cycle(mixed_workload(512, vocab, seed=1, prompt_range=(16, 256), output_range=(8, 64)))
    deadline = time.monotonic() + seconds
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300),
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker() -> None:
            while time.monotonic() < deadline:
                results.append(await _one(client, url, model, next(workload)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, help="default: the demo model")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between replica kills (0: none)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of full load before the start RSS")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ab-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for expert replicas 1 only (replicas 0 run without): an A/B under one load")
    p.add_argument("--out", type=Path, default=Path("bench/out/soak.json"))
    args = p.parse_args()
    model = args.model or ensure_demo_model()
    run_dir = Path(tempfile.mkdtemp(prefix="moe-soak-"))
    group, experts, gateway = start_cluster(model, run_dir, args.dtype, dict(kv.split("=", 1) for kv in args.ab_env))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        # Warm up at full load first: allocator pools and batch buffers grow to their working size, and the
        # growth measured afterwards is what the run adds (a leak), not start-up.
        asyncio.run(load(url, model.resolve().name, load_config(model).vocab_size, args.warmup, args.concurrency))
        rss_start = {s.name: rss_mib(s.process.pid) for s in group.services}
        stop, events, samples = threading.Event(), [], []
        killer = threading.Thread(target=chaos, args=(group, experts, args.kill_every, stop, events), daemon=True)
        killer.start()
        threading.Thread(target=sample_rss, args=(group, 30, stop, samples), daemon=True).start()
        started = time.monotonic()
        results = asyncio.run(load(url, model.resolve().name, load_config(model).vocab_size, 60 * args.minutes,
                                   args.concurrency))
        wall = time.monotonic() - started
        stop.set()
        killer.join(180)
        rss_end = {s.name: rss_mib(s.process.pid) for s in group.services if s.process.poll() is None}
        report = {"minutes": args.minutes, "concurrency": args.concurrency, "kill_every_s": args.kill_every,
                  "model": str(model), "events": events, **summarize(results, wall),
                  "rss_start_mib": rss_start, "rss_end_mib": rss_end, "rss_samples_mib": samples,
                  "rss_growth": {name: round(rss_end[name] / rss_start[name] - 1, 3)
                                 for name in rss_end if rss_end[name] and rss_start.get(name)}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: report[k] for k in ("requests", "errors", "first_error", "output_tok_s", "e2e_ms",
                                                 "rss_growth")}, indent=1))
    finally:
        group.stop()


if __name__ == "__main__":
    main()
