"""Models, health and readiness, client disconnects, deadlines, several routers, and `python -m gateway`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import aclosing
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.errors import GatewayError
from gateway.generation import ChoiceSpec, stream_choices
from gateway.router_client import AFFINITY_SLACK, RouterPool, error_from_rpc
from moe_core.pb import router_pb2, router_pb2_grpc
from moe_core.rpc import SERVER_ORIGIN
from moe_serve.ports import free_port
from tests.unit.gateway_fakes import CREATED, FakeRouter, Harness

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness(demo_model):
    with Harness(demo_model) as h:
        yield h


def test_models(harness: Harness):
    card = {"id": "demo", "object": "model", "created": CREATED, "owned_by": "moe-serve", "max_model_len": 2048}
    assert httpx.get(f"{harness.url}/v1/models").json() == {"object": "list", "data": [card]}
    assert httpx.get(f"{harness.url}/v1/models/demo").json() == card
    missing = httpx.get(f"{harness.url}/v1/models/org/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_health_and_readiness(harness: Harness):
    assert httpx.get(f"{harness.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{harness.url}/readyz").status_code == 200
    harness.fake.ready = False
    try:
        response = httpx.get(f"{harness.url}/readyz")
        assert response.status_code == 503
        assert "shard 1 has no live replica" in response.json()["reason"]
    finally:
        harness.fake.ready = True


def test_disconnect_mid_stream_cancels_the_router_call(harness: Harness):
    harness.fake.cancel_seen.clear()
    harness.fake.hanging.clear()
    body = {"model": "demo", "prompt": "#hang1 story", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{harness.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would close the connection
        first = next(lines)
        assert json.loads(first[len("data: "):])["choices"][0]["text"]
        assert harness.fake.hanging.wait(5)
        time.sleep(0.2)
        assert not harness.fake.cancel_seen.is_set()  # the stream lives as long as its client
    # Leaving the block closed the connection while the router was still generating.
    assert harness.fake.cancel_seen.wait(5)
    assert harness.fake.cancelled[-1] == harness.fake.requests[-1].request_id


def test_disconnect_before_a_response_cancels_the_router_call(harness: Harness):
    harness.fake.cancel_seen.clear()
    harness.fake.hanging.clear()
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "#hang"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", harness.port)) as sock:
        sock.sendall(head + body)
        assert harness.fake.hanging.wait(5)  # the router has the request; now the client goes away
    assert harness.fake.cancel_seen.wait(5)


def test_request_timeout_is_504(demo_model):
    with Harness(demo_model, request_timeout_s=0.5) as h:
        for stream in (False, True):
            body = {"model": "demo", "prompt": "#hang", "stream": stream}
            response = httpx.post(f"{h.url}/v1/completions", json=body)
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "timeout"
            assert "timed out" in response.json()["error"]["message"]
        body = {"model": "demo", "prompt": "#hang1", "stream": True}
        events = httpx.post(f"{h.url}/v1/completions", json=body).text.split("\n\n")
        assert json.loads(events[-3][len("data: "):])["error"]["code"] == "timeout"
        assert events[-2] == "data: [DONE]"
        assert h.fake.cancel_seen.wait(5)  # the router was told to stop too


def test_an_unreachable_router_is_skipped(demo_model):
    with Harness(demo_model, dead_routers_first=1) as h:
        with httpx.Client(base_url=h.url) as client:
            for _ in range(3):
                response = client.post("/v1/completions", json={"model": "demo", "prompt": "Hi", "n": 2})
                assert response.status_code == 200 and len(response.json()["choices"]) == 2
            assert client.get("/readyz").status_code == 200
            assert client.get("/v1/models").status_code == 200
        assert len(h.fake.requests) == 6


@pytest.mark.parametrize(("code", "status"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.OUT_OF_RANGE, 400), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.FAILED_PRECONDITION, 500), (grpc.StatusCode.UNKNOWN, 500),
])
def test_grpc_codes_map_to_http_statuses(code: grpc.StatusCode, status: int):
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*SERVER_ORIGIN), details="detail")
    assert error_from_rpc(exc).status == status


def test_no_router_reachable_is_503():
    async def scenario() -> GatewayError:
        pool = RouterPool([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
        try:
            chunks = pool.generate([1, 2], router_pb2.SamplingParams(max_tokens=1), "r1", timeout_s=5)
            with pytest.raises(GatewayError) as info:
                await anext(chunks)
            return info.value
        finally:
            await pool.close()

    error = asyncio.run(scenario())
    assert error.status == 503 and "127.0.0.1" not in error.message


async def fake_routers(harness: Harness, n: int) -> tuple[list[FakeRouter], list[grpc.aio.Server], list[str]]:
    fakes, servers, addresses = [], [], []
    for _ in range(n):
        fake, server = FakeRouter(harness.tokenizer), grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        fakes.append(fake)
        servers.append(server)
    return fakes, servers, addresses


def test_requests_go_to_the_router_with_fewest_in_flight(harness: Harness):
    async def scenario() -> tuple[FakeRouter, FakeRouter]:
        fakes, servers, addresses = await fake_routers(harness, 2)
        pool = RouterPool(addresses, affinity_tokens=0)
        sampling = router_pb2.SamplingParams(max_tokens=4)
        hanging = pool.generate(harness.tokenizer.encode("#hang1"), sampling, "busy")
        await anext(hanging)  # one request in flight, on the first router
        async for _ in pool.generate([1, 300], sampling, "second"):
            pass
        assert pool.in_flight() == {addresses[0]: 1, addresses[1]: 0}
        await hanging.aclose()
        await pool.close()
        for server in servers:
            await server.stop(grace=None)
        return fakes[0], fakes[1]

    first, second = asyncio.run(scenario())
    assert [r.request_id for r in first.requests] == ["busy"]
    assert [r.request_id for r in second.requests] == ["second"]
    assert first.cancelled == ["busy"]  # closing the iteration cancelled the call


def test_the_choices_of_one_prompt_go_to_one_router(harness: Harness):
    """n choices of a prompt on one router, even with prompt affinity off: its prefix cache prefills
    the prompt once for all of them."""
    async def scenario() -> tuple[FakeRouter, FakeRouter]:
        fakes, servers, addresses = await fake_routers(harness, 2)
        pool = RouterPool(addresses, affinity_tokens=0)
        sampling = router_pb2.SamplingParams(max_tokens=4)
        specs = [ChoiceSpec(i, prompt, sampling) for i, prompt in enumerate([[1, 300]] * 3 + [[1, 400]] * 3)]
        async with aclosing(stream_choices(pool, specs, "n3", time.monotonic() + 30)) as events:
            finished = [event.index async for event in events if event.chunk.finished]
        assert sorted(finished) == list(range(6))
        await pool.close()
        for server in servers:
            await server.stop(grace=None)
        return fakes[0], fakes[1]

    first, second = asyncio.run(scenario())
    by_router = [sorted(tuple(r.prompt_ids) for r in fake.requests) for fake in (first, second)]
    assert sorted(by_router) == [[(1, 300)] * 3, [(1, 400)] * 3]  # each prompt on one router, the two spread


def test_a_prompt_goes_to_its_own_router_every_time(harness: Harness):
    """Prompt affinity over two routers: each prompt's requests, one at a time, all land on the router
    its first tokens hash to, and the prompts use both routers."""
    prompts = [[1, 300 + i, 7, 8] for i in range(24)]  # all on one router: 2 in 2^24

    async def scenario() -> tuple[list[FakeRouter], list[str], RouterPool]:
        fakes, servers, addresses = await fake_routers(harness, 2)
        pool = RouterPool(addresses, affinity_tokens=3)
        for round_ in range(2):
            for i, prompt in enumerate(prompts):
                async for _ in pool.generate([*prompt[:3], round_], router_pb2.SamplingParams(max_tokens=2), f"{i}"):
                    pass
        await pool.close()
        for server in servers:
            await server.stop(grace=None)
        return fakes, addresses, pool

    fakes, addresses, pool = asyncio.run(scenario())
    for fake, address in zip(fakes, addresses, strict=True):
        served = sorted(list(r.prompt_ids[:3]) for r in fake.requests)
        assert served and served == sorted(p[:3] for p in prompts if pool.affinity(p) == address for _ in range(2))


def test_prompt_affinity_is_stable_spread_and_gives_way_to_load():
    addresses = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
    rng = random.Random(0)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(4, 20))] for _ in range(300)]
    pool = RouterPool(addresses, affinity_tokens=8)
    owners = [pool.affinity(p) for p in prompts]
    assert owners == [RouterPool(addresses, affinity_tokens=8).affinity(p) for p in prompts]  # every gateway agrees
    assert set(Counter(owners)) == set(addresses) and min(Counter(owners).values()) >= 60
    assert all(pool.affinity([*p[:8], 1, 2]) == owner for p, owner in zip(prompts, owners, strict=True)
               if len(p) >= 8)  # only the first 8 tokens count
    smaller = RouterPool(addresses[:2], affinity_tokens=8)  # a router gone: only its prompts move
    assert all(smaller.affinity(p) == owner for p, owner in zip(prompts, owners, strict=True) if owner != addresses[2])
    assert RouterPool(addresses, affinity_tokens=0).affinity(prompts[0]) is None
    assert RouterPool(addresses[:1]).affinity(prompts[0]) is None

    own = owners[0]
    routers = {r.address: r for r in pool._routers}
    routers[own].in_flight = AFFINITY_SLACK  # the others idle: still within the slack
    assert pool._pick(set(), prefer=own).address == own
    routers[own].in_flight = AFFINITY_SLACK + 1
    assert pool._pick(set(), prefer=own).address != own
    routers[own].in_flight, routers[own].failed_at = 0, time.monotonic()  # just failed: cooling down
    assert pool._pick(set(), prefer=own).address != own


def run_gateway(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_process_serves_on_port_0_and_exits_cleanly_on_sigterm(demo_model, harness: Harness, tmp_path: Path):
    ready = tmp_path / "gateway.json"
    proc = run_gateway("--model", str(demo_model), "--router", harness.settings.router[-1], "--port", "0",
                       "--ready-file", str(ready), "--model-name", "demo", "--log-level", "warning",
                       "--drain-grace-s", "0.2")
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():  # a separate process: nothing to wait on but its file
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        response = httpx.post(f"http://127.0.0.1:{info['port']}/v1/completions",
                              json={"model": "demo", "prompt": "Hello", "max_tokens": 2})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not ready.exists()


def test_process_gives_up_when_no_router_answers(demo_model):
    proc = run_gateway("--model", str(demo_model), "--router", f"127.0.0.1:{free_port()}", "--port", "0",
                       "--startup-timeout-s", "0.5")
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "no router answered" in output
