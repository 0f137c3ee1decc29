"""`moe-serve health`: a health check for containers, which have neither curl nor grpcurl.

    moe-serve health --grpc 127.0.0.1:50051 --service moe.v1.ExpertService   # grpc.health.v1 Check
    moe-serve health --http http://127.0.0.1:8000/readyz                     # any 2xx
    python -m moe_serve.health ...                                           # the same, without the CLI's imports

Exit status 0 when healthy, 1 when not (the reason on stderr), 2 on bad arguments. With neither flag
the target comes from the container itself (`--auto`): the service started by `python -m <service>`
as PID 1 (or its child under an init), on the port of its `--port` flag, `MOE_PORT` or the default.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULTS = {"gateway": ("http", 8000, "/readyz"), "router_service": ("grpc", 50050, "moe.v1.RouterService"),
            "expert_service": ("grpc", 50051, "moe.v1.ExpertService")}


def check_grpc(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, status) of a grpc.health.v1 Check; `service` "" asks about the server as a whole."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def check_http(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, status) of a GET: healthy on any 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unreachable: {reason}"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def auto_target(argv: list[str] | None = None, env: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(kind, address or URL, service) of the service this container runs, from PID 1's command line."""
    env = os.environ if env is None else env
    argv = argv if argv is not None else _cmdline(1)
    if not any(a in DEFAULTS for a in argv):  # an init as PID 1: look at its first child
        children = Path("/proc/1/task/1/children")
        kids = children.read_text().split() if children.exists() else []
        argv = _cmdline(int(kids[0])) if kids else argv
    module = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m" and argv[i + 1] in DEFAULTS), None)
    if module is None:
        raise SystemExit("moe-serve health: cannot tell which service runs here; give --grpc or --http")
    kind, port, what = DEFAULTS[module]
    flag = argv.index("--port") + 1 if "--port" in argv[:-1] else None
    port = int(argv[flag] if flag else env.get("MOE_PORT", port))
    if kind == "http":
        return kind, f"http://127.0.0.1:{port}{what}", ""
    return kind, f"127.0.0.1:{port}", what


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument("--grpc", metavar="HOST:PORT", help="ask grpc.health.v1 Check at this address")
    target.add_argument("--http", metavar="URL", help="GET this URL; healthy on 2xx")
    target.add_argument("--auto", action="store_true", help="check the service this container runs (default)")
    p.add_argument("--service", default="", help="with --grpc: the service name to ask about (default: the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing when healthy")


def run(args: argparse.Namespace) -> int:
    if args.grpc:
        target, service, kind = args.grpc, args.service, "grpc"
    elif args.http:
        target, service, kind = args.http, "", "http"
    else:
        kind, target, service = auto_target()
    if kind == "grpc":
        ok, status = check_grpc(target, service, args.timeout)
    else:
        ok, status = check_http(target, args.timeout)
    where = f"{target} {service}".strip()
    if not ok:
        print(f"unhealthy: {where}: {status}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"healthy: {where}: {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_serve.health", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
