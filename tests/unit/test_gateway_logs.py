"""Request ids end to end, JSON logs without prompt text, disconnects as disconnects, and deadlines on every wait."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from moe_core.logs import JsonFormatter, RequestIdFilter
from tests.unit.gateway_fakes import Harness

KEY = "sk-logs-secret-key"
SECRET = "Zebra-Quokka-prompt-text"
GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def harness(demo_model):
    with Harness(demo_model, api_keys=[KEY], max_body_bytes=4096) as h:
        yield h


@pytest.fixture
def client(harness: Harness) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=harness.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as c:
        yield c


@contextlib.contextmanager
def json_logs(level: int = logging.INFO) -> Iterator[io.StringIO]:
    """Everything logged meanwhile, formatted as the gateway's --log-format json would."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter("gateway"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def entries(out: io.StringIO, wait_for: str | None = None) -> list[dict]:
    """The JSON lines logged so far, each parsed; waits (briefly) for a line whose msg contains `wait_for`."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        if wait_for is None or any(wait_for in line["msg"] for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def access_line(lines: list[dict], request_id: str) -> dict:
    found = [line for line in lines if line["logger"] == "gateway.access" and line.get("request_id") == request_id]
    assert len(found) == 1, lines
    return found[0]


def test_a_client_request_id_travels_to_the_router_and_back(harness: Harness, client: httpx.Client):
    for stream in (False, True):
        rid = f"client-id_1.{int(stream)}"
        body = {"model": "demo", "prompt": "Hello", "max_tokens": 2, "n": 2, "stream": stream}
        response = client.post("/v1/completions", json=body, headers={"x-request-id": rid})
        assert response.status_code == 200 and response.headers["x-request-id"] == rid
        sent = harness.fake.requests[-2:]
        assert sorted(r.request_id for r in sent) == [f"{rid}-0", f"{rid}-1"]
        assert [m["x-request-id"] for m in harness.fake.metadata[-2:]] == [rid, rid]


@pytest.mark.parametrize("unsafe", ["has space", "x" * 65, "semi;colon", "\u00e9t\u00e9", "new\tline"])
def test_unsafe_request_ids_are_replaced(harness: Harness, client: httpx.Client, unsafe: str):
    response = client.post("/v1/chat/completions", headers={"x-request-id": unsafe.encode()},
                           json={"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    rid = response.headers["x-request-id"]
    assert GENERATED.match(rid)
    assert harness.fake.metadata[-1]["x-request-id"] == rid and harness.fake.requests[-1].request_id == f"{rid}-0"


def test_every_response_carries_a_request_id(harness: Harness, client: httpx.Client):
    responses = [
        client.get("/healthz"), client.get("/readyz"), client.get("/metrics"), client.get("/openapi.json"),
        client.get("/v1/models"), client.get("/v1/nothing"), client.get("/v1/completions"),
        client.post("/v1/completions", json={"model": "demo"}),
        client.post("/v1/completions", json={"model": "demo", "prompt": "x" * 5000}),
        client.post("/v1/completions", json={"model": "demo", "prompt": "#503"}),
        client.post("/v1/completions", json={"model": "demo", "prompt": "#500", "stream": True}),
        client.post("/v1/completions", json={"model": "demo", "prompt": "#midfail", "stream": True}),
        httpx.get(f"{harness.url}/v1/models"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 404, 405, 400, 413, 503, 500, 200, 401]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(GENERATED.match(rid) for rid in ids) and len(set(ids)) == len(ids)


def test_json_logs_have_the_request_id_and_no_prompt_or_key(harness: Harness, client: httpx.Client):
    with json_logs() as out:
        body = {"model": "demo", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body, headers={"x-request-id": "log-1"}).status_code == 200
        bad = {"model": "demo", "prompt": SECRET, "temperature": 9}
        assert client.post("/v1/completions", json=bad, headers={"x-request-id": "log-2"}).status_code == 400
        failing = {"model": "demo", "prompt": f"#500 {SECRET}", "stream": True}
        assert client.post("/v1/completions", json=failing, headers={"x-request-id": "log-3"}).status_code == 500
        httpx.get(f"{harness.url}/v1/models", headers={"x-request-id": "log-4", "Authorization": "Bearer wrong"})
        lines = entries(out, wait_for="request_id=log-4")
    text = out.getvalue()
    assert SECRET not in text and KEY not in text and "wrong" not in text
    ok = access_line(lines, "log-1")
    assert ok["level"] == "info" and ok["service"] == "gateway"
    key_id = hashlib.sha256(KEY.encode()).hexdigest()[:6]
    assert re.fullmatch(rf"POST /v1/chat/completions 200 [0-9.]+ms request_id=log-1 key={key_id}", ok["msg"])
    assert access_line(lines, "log-2")["msg"].startswith("POST /v1/completions 400 ")
    assert access_line(lines, "log-4")["msg"].startswith("GET /v1/models 401 ")
    assert access_line(lines, "log-4")["msg"].endswith(" key=-")
    router_error = [line for line in lines if line["level"] == "error"]
    assert router_error and all(line.get("request_id") == "log-3" for line in router_error)


def test_prompts_are_logged_only_when_asked(demo_model):
    with Harness(demo_model, log_prompts=True) as h, json_logs(logging.DEBUG) as out:
        body = {"model": "demo", "prompt": SECRET, "max_tokens": 1}
        assert httpx.post(f"{h.url}/v1/completions", json=body, headers={"x-request-id": "p-1"}).status_code == 200
        lines = entries(out, wait_for="request_id=p-1 key")
    logged = [line for line in lines if SECRET in line["msg"]]
    assert len(logged) == 1 and logged[0]["level"] == "debug" and logged[0]["request_id"] == "p-1"
    assert "request_id=p-1" in logged[0]["msg"]


def test_probe_access_lines_are_debug(harness: Harness, client: httpx.Client):
    with json_logs(logging.DEBUG) as out:
        client.get("/healthz", headers={"x-request-id": "probe-1"})
        lines = entries(out, wait_for="request_id=probe-1")  # httpx's own debug lines show the header
    assert access_line(lines, "probe-1")["level"] == "debug"


def disconnects(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('moe_http_client_disconnects_total{route="/v1/completions"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_disconnect_mid_stream_is_logged_as_such_counted_and_cancels_the_router_call(
        harness: Harness, client: httpx.Client):
    before = disconnects(client)
    harness.fake.cancel_seen.clear()
    harness.fake.hanging.clear()
    with json_logs() as out:
        body = {"model": "demo", "prompt": "#hang1 story", "max_tokens": 8, "stream": True}
        with client.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "gone-1"}) as response:
            lines = response.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")
            assert harness.fake.hanging.wait(5)
            time.sleep(0.2)
            assert not harness.fake.cancel_seen.is_set()  # still streaming while the client stays
        assert harness.fake.cancel_seen.wait(5)  # the router call is cancelled at once
        lines = entries(out, wait_for="request_id=gone-1 key")
    assert harness.fake.cancelled[-1] == "gone-1-0"
    gone = [line for line in lines if "client disconnected" in line["msg"]]
    assert len(gone) == 1 and gone[0]["level"] == "info" and gone[0]["request_id"] == "gone-1"
    assert not [line for line in lines if line["level"] in ("error", "warning", "critical")]
    assert access_line(lines, "gone-1")["msg"].endswith("client_disconnected")
    assert disconnects(client) == before + 1


def test_model_info_and_a_slow_body_are_bounded_by_the_request_timeout(demo_model):
    with Harness(demo_model, request_timeout_s=0.5) as h:
        h.fake.info_hangs = True
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/models/demo", None),
                                   ("POST", "/v1/completions", {"model": "demo", "prompt": "Hi"})):
            started = time.monotonic()
            response = httpx.request(method, f"{h.url}{path}", json=body, timeout=10)
            assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
            assert time.monotonic() - started < 2.5
        h.fake.info_hangs = False
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"model\":")  # and then nothing more
        with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
            sock.sendall(head)
            answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 504") and "x-request-id" in answer
