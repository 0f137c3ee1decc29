"""`moe-serve health`: the container health check against a real gRPC health servicer and an HTTP server."""

from __future__ import annotations

import asyncio
import http.server
import socket
import subprocess
import sys
import threading

import pytest

from moe_core.pb import expert_pb2, router_pb2
from moe_core.rpc import add_health, bind, new_server, set_serving
from moe_serve import cli, health
from moe_serve.deploy.spec import GRPC_SERVICES

SERVICE = "moe.v1.ExpertService"


@pytest.fixture
def grpc_health():
    """(address, set_serving(bool)) of a gRPC server with only the health servicer, in a background loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = new_server()
        servicer = add_health(server)
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        await set_serving(servicer, [SERVICE], True)
        return server, servicer, port

    server, servicer, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)

    def serving(flag: bool) -> None:
        asyncio.run_coroutine_threadsafe(set_serving(servicer, [SERVICE], flag), loop).result(10)

    yield f"127.0.0.1:{port}", serving
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = {"/healthz": 200, "/created": 201, "/readyz": 503}.get(self.path, 404)
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_serving_then_not(grpc_health):
    address, serving = grpc_health
    assert health.check_grpc(address, SERVICE) == (True, "SERVING")
    assert health.check_grpc(address)[0]  # the server as a whole
    assert health.main(["--grpc", address, "--service", SERVICE]) == 0
    serving(False)
    assert health.check_grpc(address, SERVICE) == (False, "NOT_SERVING")
    assert health.main(["--grpc", address, "--service", SERVICE, "-q"]) == 1


def test_grpc_unknown_service_and_nothing_listening(grpc_health, capsys):
    address, _ = grpc_health
    ok, status = health.check_grpc(address, "moe.v1.NoSuchService")
    assert not ok and status.startswith("NOT_FOUND")
    ok, status = health.check_grpc(f"127.0.0.1:{closed_port()}", SERVICE, timeout=1.0)
    assert not ok and status.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    assert health.main(["--grpc", f"127.0.0.1:{closed_port()}", "--timeout", "1"]) == 1
    assert "unhealthy" in capsys.readouterr().err


def test_http_statuses(http_server):
    assert health.check_http(f"{http_server}/healthz") == (True, "HTTP 200")
    assert health.check_http(f"{http_server}/created")[0]
    assert health.check_http(f"{http_server}/readyz") == (False, "HTTP 503")
    assert health.main(["--http", f"{http_server}/healthz"]) == 0
    assert health.main(["--http", f"{http_server}/readyz"]) == 1
    ok, status = health.check_http(f"http://127.0.0.1:{closed_port()}/healthz", timeout=1.0)
    assert not ok and status.startswith("unreachable")


def test_moe_serve_health_subcommand_and_module(grpc_health, http_server):
    address, _ = grpc_health
    assert cli.main(["health", "--grpc", address, "--service", SERVICE]) == 0
    assert cli.main(["health", "--http", f"{http_server}/readyz"]) == 1
    # What the containers run: no CLI (and no torch) imports on the probe path.
    done = subprocess.run([sys.executable, "-m", "moe_serve.health", "--grpc", address, "--service", SERVICE],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout


def test_auto_target_from_the_container_command():
    argv = ["/usr/bin/tini", "--", "python", "-m", "expert_service", "--port", "6000"]
    assert health.auto_target(argv, {}) == ("grpc", "127.0.0.1:6000", "moe.v1.ExpertService")
    assert health.auto_target(["python", "-m", "router_service"], {"MOE_PORT": "7000"}) == (
        "grpc", "127.0.0.1:7000", "moe.v1.RouterService")
    assert health.auto_target(["python", "-m", "gateway"], {}) == ("http", "http://127.0.0.1:8000/readyz", "")
    with pytest.raises(SystemExit):
        health.auto_target(["sleep", "1"], {})


def test_probed_service_names_are_the_real_ones():
    assert GRPC_SERVICES["router"] == router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
    assert GRPC_SERVICES["expert"] == expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
    assert health.DEFAULTS["router_service"][2] == GRPC_SERVICES["router"]
    assert health.DEFAULTS["expert_service"][2] == GRPC_SERVICES["expert"]
