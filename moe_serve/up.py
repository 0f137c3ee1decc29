"""`moe-serve up`: a whole local cluster as processes — expert shards × replicas, router(s), gateway.

Every service binds a free port (or the one given) and reports it through a ready file; `cluster.json`
in the run folder lists every service with its role, shard, replica, port and pid. Logs stream to the
terminal with a prefix per service (and to one file each in the run folder). Ctrl-C or SIGTERM stops
everything; so does the gateway or a router exiting.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import httpx

from moe_core.config import load_config
from moe_core.demo import ensure_demo_model
from moe_core.placement import ShardSpec, even_split, ffn_split, load_placement, split_by_layers, write_placement
from moe_serve.launcher import LaunchError, ProcessGroup, Service
from moe_serve.prometheus import start_prometheus


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (Hugging Face layout); default: the built-in demo model")
    p.add_argument("--shards", type=int, default=2, help="expert shards (0: experts inside the router process)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per shard")
    p.add_argument("--placement", help="placement file (JSON) instead of an even split into --shards")
    p.add_argument("--split", choices=["experts", "ffn", "layers"], default="experts",
                   help="how --shards divides the experts: a slice of every layer's experts per shard; a slice of "
                        "every expert's FFN per shard (every shard works on every row, so the shards stay in step "
                        "whichever experts the gates pick); or whole layers per shard")
    p.add_argument("--routers", type=int, default=1, help="routers behind the gateway")
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    p.add_argument("--port", type=int, default=8000, help="the gateway's HTTP port (0: a free port)")
    p.add_argument("--run-dir", type=Path,
                   help="folder for cluster.json, logs and ready files (default: a new temp folder)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (for router and experts)")
    p.add_argument("--kv-cache-mib", type=int, default=1024, help="each router's KV-cache budget")
    p.add_argument("--max-model-len", type=int, default=0, help="longest prompt + output (0: the model's)")
    p.add_argument("--router-threads", type=int, default=0,
                   help="torch threads per router (0: all cores)")
    p.add_argument("--expert-threads", type=int, default=0,
                   help="torch threads per expert service (0: cores divided among the shards)")
    p.add_argument("--cache", choices=["off", "local", "redis"], default=None,
                   help="expert-output cache (default: redis with --redis, else off)")
    p.add_argument("--redis", metavar="URL", help="Redis for the expert-output cache, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--draft-tokens", type=int, default=0,
                   help="repeat drafts: a request that repeats an earlier one verifies up to this many tokens of "
                        "the earlier output per step (0: off)")
    p.add_argument("--rpc-timeout-s", type=float, default=30.0, help="deadline of one router -> shard call")
    p.add_argument("--router-arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for every router, e.g. --router-arg=--no-overlap (repeatable)")
    p.add_argument("--expert-arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for every expert service (repeatable)")
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="how long to wait for services to start")
    p.add_argument("--prometheus", nargs="?", const=0, type=int, metavar="PORT",
                   help="also run Prometheus (the `prometheus` binary) scraping the cluster, on PORT (default: free)")
    p.add_argument("--ask", metavar="PROMPT", help="once the cluster is up, ask it this (a streamed completion)")
    p.add_argument("--max-tokens", type=int, default=48, help="with --ask: tokens to generate")
    p.add_argument("--exit-after-ask", action="store_true", help="with --ask: stop the cluster after the answer")


def build_args(argv: list[str]) -> argparse.Namespace:
    """`moe-serve up` arguments from a list (for tools that start clusters piece by piece, e.g. the soak run)."""
    parser = argparse.ArgumentParser(prog="moe-serve up")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="moe-serve-"))
    return args


def _python(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", module, *flags]


def plan_shards(args: argparse.Namespace, model: Path) -> list[ShardSpec]:
    cfg = load_config(model)
    if args.placement:
        return load_placement(args.placement, cfg)
    split = {"experts": even_split, "ffn": ffn_split, "layers": split_by_layers}[args.split]
    return split(cfg, args.shards)


def start_experts(group: ProcessGroup, args, model: Path, specs: list[ShardSpec], placement: Path) -> list[Service]:
    cores = os.cpu_count() or 1
    # Shards that each hold whole layers take turns; shards holding slices of every layer run together.
    threads = args.expert_threads or (cores if args.split == "layers" else max(1, cores // len(specs)))
    services = []
    for spec in specs:
        for r in range(args.replicas):
            name = f"expert {spec.shard_id.removeprefix('shard-')}.{r}"
            ready = args.run_dir / f"{name.replace(' ', '-')}.ready"
            argv = _python("expert_service", "--model", str(model), "--placement", str(placement),
                           "--shard-id", spec.shard_id, "--host", args.host, "--port", "0", "--data-port", "0",
                           "--metrics-port", "0",
                           "--ready-file", str(ready),
                           "--dtype", args.dtype, "--device", args.device, "--threads", str(threads),
                           "--drain-grace-s", "0.5", *args.expert_arg)
            services.append(group.start(Service(name, "expert", argv, ready, {"shard": spec.shard_id, "replica": r}),
                                        SHARED_CORES_ENV))
    return services


# The services of one `up` share this machine's cores and mostly wait for each other (a router for its
# shards, a shard for the router). OpenMP's default lets an idle worker spin for 300,000 rounds after
# each op, burning the core another service needs (on cluster-2-layers at concurrency 1, time per output
# token went from 58 ms to 34-38 ms with passive waiting, bench/RESULTS.md); passive waiting instead
# pays a futex wake-up on every op of a multi-threaded process (a two-thread router's dense part of a
# batch-32 decode step: 52 ms passive, 27 ms spinning). A bounded spin keeps back-to-back ops cheap and
# lets a waiting process's workers sleep early in the other's turn: 1.2x the output tokens/s of passive
# waiting (with a one-thread router beside expert slices) on cluster-2 and cluster-2-layers
# (bench/RESULTS.md, "A bounded spin"). One process alone (the router with local experts) keeps the
# default. A wait setting the user made wins. The count is of `pause` rounds, whose latency depends on
# the CPU (≈ 25 ns on the Xeons we measured, so 30,000 spun 0.75 ms of a layer's ≈ 2.7 ms expert
# round trip at concurrency 1, and a waiting router's worker held a core the shards needed). 3,000 (≈ 75 µs)
# gave 1.12x at concurrency 1 and 1.05x at 32 on cluster-2 (bench/RESULTS.md, "The spin's length").
SPIN_COUNT = 3_000
_USER_WAIT = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
SHARED_CORES_ENV = {} if _USER_WAIT else {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def start_routers(group: ProcessGroup, args, model: Path, placement: Path | None) -> list[Service]:
    services = []
    for i in range(args.routers):
        ready = args.run_dir / f"router-{i}.ready"
        experts = ["--placement", str(placement)] if placement else ["--experts", "local"]
        argv = _python("router_service", "--model", str(model), *experts, *_cache_flags(args), "--host", args.host,
                       "--port", "0", "--metrics-port", "0",
                       "--ready-file", str(ready), "--dtype", args.dtype, "--device", args.device,
                       "--kv-cache-mib", str(args.kv_cache_mib), "--max-model-len", str(args.max_model_len),
                       "--threads", str(args.router_threads), "--rpc-timeout-s", str(args.rpc_timeout_s),
                       *(["--draft-tokens", str(args.draft_tokens)] if args.draft_tokens else []), *args.router_arg)
        services.append(group.start(Service(f"router {i}", "router", argv, ready, {"index": i}),
                                    SHARED_CORES_ENV if placement else None))
    return services


def _cache_flags(args) -> list[str]:
    mode = args.cache or ("redis" if args.redis else "off")
    if mode == "redis" and not args.redis:
        raise LaunchError("--cache redis needs --redis URL (e.g. --redis redis://127.0.0.1:6379/0)")
    return ["--cache", mode, *(["--redis-url", args.redis] if args.redis else [])]


def start_gateway(group: ProcessGroup, args, model: Path, routers: list[Service]) -> Service:
    ready = args.run_dir / "gateway.ready"
    argv = _python("gateway", "--model", str(model), "--host", args.host, "--port", str(args.port),
                   "--ready-file", str(ready))
    for router in routers:
        argv += ["--router", f"{args.host}:{router.port}"]
    return group.start(Service("gateway", "gateway", argv, ready))


def _metrics_url(host: str, service: Service) -> str | None:
    if service.role == "gateway":
        return f"http://{host}:{service.port}/metrics"
    port = service.ready.get("metrics_port")
    return f"http://{host}:{port}/metrics" if port else None


def write_cluster_file(args, model: Path, group: ProcessGroup, gateway: Service) -> Path:
    services = [{"name": s.name, "role": s.role, **s.info, "host": args.host, "port": s.port,
                 "pid": s.process.pid, "metrics_url": _metrics_url(args.host, s),
                 "log": str(args.run_dir / f"{s.name.replace(' ', '-')}.log")}
                for s in group.services]
    base = f"http://{args.host}:{gateway.port}"
    cluster = {"model": str(model), "run_dir": str(args.run_dir), "url": base, "openai_base_url": f"{base}/v1",
               "services": services}
    path = args.run_dir / "cluster.json"
    path.write_text(json.dumps(cluster, indent=2) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        _cache_flags(args)
    except LaunchError as exc:
        print(f"moe-serve up: {exc}", file=sys.stderr)
        return 2
    model = Path(args.model) if args.model else ensure_demo_model()
    args.run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="moe-serve-"))
    args.run_dir.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(args.run_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        placement, specs = None, []
        if args.shards or args.placement:
            specs = plan_shards(args, model)
            placement = args.run_dir / "placement.json"
            write_placement(placement, specs)
            experts = start_experts(group, args, model, specs, placement)
            group.wait_ready(experts, args.ready_timeout_s)
            for spec in specs:
                spec.replicas = [f"{args.host}:{s.port}" for s in experts if s.info["shard"] == spec.shard_id]
            write_placement(placement, specs)
        routers = start_routers(group, args, model, placement)
        group.wait_ready(routers, args.ready_timeout_s)
        gateway = start_gateway(group, args, model, routers)
        group.wait_ready([gateway], args.ready_timeout_s)
        cluster = write_cluster_file(args, model, group, gateway)
        if args.prometheus is not None:
            info = json.loads(cluster.read_text())
            prometheus, url = start_prometheus(args.run_dir, info, args.prometheus)
            group.adopt(Service("prometheus", "prometheus", [], args.run_dir / "prometheus.ready", {"url": url}),
                        prometheus)
            cluster.write_text(json.dumps({**info, "prometheus_url": url}, indent=2) + "\n")
            print(f"Prometheus: {url}  (dashboards: deploy/grafana, see docs/observability.md)", flush=True)
        _announce(gateway, args, model, cluster)
        if args.ask:
            ask(f"http://{args.host}:{gateway.port}/v1", model.resolve().name, args.ask, args.max_tokens)
            if args.exit_after_ask:
                return 0
        return _supervise(group, stop)
    except LaunchError as exc:
        print(f"moe-serve up: {exc}", file=sys.stderr)
        return 1
    finally:
        group.stop()


def _announce(gateway: Service, args, model: Path, cluster: Path) -> None:
    url = f"http://{args.host}:{gateway.port}"
    body = json.dumps({"model": model.resolve().name, "prompt": "Once upon a time", "max_tokens": 32})
    print(f"\nmoe-serve is up: {url}/v1  (cluster file {cluster})\n"
          f"  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n"
          f"  Ctrl-C stops the cluster.\n", flush=True)


def ask(base_url: str, model_name: str, prompt: str, max_tokens: int) -> None:
    """Stream one completion from the gateway, as any OpenAI client would, and print it."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    print(f"\n>>> {prompt}", end="", flush=True)
    usage = {}
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=120) as response:
        if response.status_code != 200:
            raise LaunchError(f"the gateway answered {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            for choice in event.get("choices", []):
                print(choice.get("text", ""), end="", flush=True)
            usage = event.get("usage") or usage
    print(f"\n<<< {usage.get('prompt_tokens')} prompt tokens, {usage.get('completion_tokens')} generated\n",
          flush=True)


def _supervise(group: ProcessGroup, stop: threading.Event) -> int:
    """Run until Ctrl-C/SIGTERM, or until the gateway or a router exits (expert replicas may come and go)."""
    reported: set[str] = set()
    while not stop.wait(0.5):
        for service in group.services:
            if service.process.poll() is None or service.name in reported:
                continue
            reported.add(service.name)
            print(f"moe-serve up: {service.name} exited with status {service.process.returncode}", flush=True)
            if service.role not in ("expert", "prometheus"):  # the cluster still serves without these
                return 1
    return 0
