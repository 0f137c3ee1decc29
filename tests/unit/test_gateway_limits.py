"""Limits: requests per minute and in flight per key (or address), prompt and output size, and the router's queue."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from gateway.errors import GatewayError
from gateway.limits import SWEEP_EVERY_S, ClientLimits, RateLimiter
from tests.unit.gateway_fakes import Harness

KEY, OTHER = "sk-limits-1", "sk-limits-2"
COMPLETION = {"model": "demo", "prompt": "Hi", "max_tokens": 2}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def retry_after(response: httpx.Response) -> int:
    value = response.headers["retry-after"]
    assert value.isdigit() and int(value) >= 1, value
    return int(value)


def assert_429(response: httpx.Response) -> dict:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    retry_after(response)
    return error


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_minute_then_refills():
    clock = Clock()
    limiter = RateLimiter(3, clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(20.0)  # one token per 20 s at 3 per minute
    assert limiter.take("b") == 0.0  # per client
    clock.now += 10
    assert limiter.take("a") == pytest.approx(10.0)
    clock.now += 10
    assert limiter.take("a") == 0.0
    clock.now += SWEEP_EVERY_S + 1  # idle clients are forgotten once their bucket would be full again
    limiter.take("c")
    assert len(limiter) == 1


def test_client_limits_count_in_and_out():
    limits = ClientLimits(rpm=0, max_in_flight=2)
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(GatewayError) as info:
        limits.admit("a")
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    limits.admit("b")
    limits.release("a")
    limits.admit("a")
    for _ in range(3):
        limits.release("a")
    assert limits.in_flight("a") == 0


def test_rate_limit_per_key(demo_model):
    with Harness(demo_model, api_keys=[KEY, OTHER], rate_limit_rpm=3) as h, httpx.Client(base_url=h.url) as client:
        for _ in range(3):
            assert client.get("/v1/models", headers=auth(KEY)).status_code == 200
        limited = client.post("/v1/completions", json=COMPLETION, headers=auth(KEY))
        error = assert_429(limited)
        assert 15 <= retry_after(limited) <= 20 and "3 requests per minute" in error["message"]
        assert client.get("/v1/models", headers=auth(OTHER)).status_code == 200  # another key, another bucket
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/v1/models", headers=auth("wrong")).status_code == 401  # auth comes first


def test_rate_limit_per_address_without_keys(demo_model):
    with Harness(demo_model, rate_limit_rpm=2) as h, httpx.Client(base_url=h.url) as client:
        assert [client.get("/v1/models").status_code for _ in range(2)] == [200, 200]
        assert_429(client.get("/v1/models"))
        assert_429(client.post("/v1/chat/completions", json={"model": "demo", "messages": []}))
        assert client.get("/metrics").status_code == 200


def test_concurrent_requests_per_key(demo_model):
    with Harness(demo_model, api_keys=[KEY, OTHER], max_streams_per_key=1) as h, \
            httpx.Client(base_url=h.url, timeout=10) as client:
        body = {"model": "demo", "prompt": "#hang1 story", "max_tokens": 8, "stream": True}
        with client.stream("POST", "/v1/completions", json=body, headers=auth(KEY)) as stream:
            lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")
            error = assert_429(client.post("/v1/completions", json=COMPLETION, headers=auth(KEY)))
            assert "at most 1" in error["message"]
            assert retry_after(client.get("/v1/models", headers=auth(KEY))) == 1
            assert client.post("/v1/completions", json=COMPLETION, headers=auth(OTHER)).status_code == 200
        assert h.fake.cancel_seen.wait(5)
        deadline = time.monotonic() + 5  # the slot frees once the server has seen the stream end
        while client.get("/v1/models", headers=auth(KEY)).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_concurrent_limit_counts_non_streaming_requests(demo_model):
    with Harness(demo_model, max_streams_per_key=1, request_timeout_s=1) as h, \
            httpx.Client(base_url=h.url, timeout=10) as client:
        h.fake.hanging.clear()
        outcome: list[int] = []
        waiting = threading.Thread(target=lambda: outcome.append(
            client.post("/v1/completions", json={"model": "demo", "prompt": "#hang"}).status_code))
        waiting.start()
        assert h.fake.hanging.wait(5)
        assert_429(client.get("/v1/models"))
        waiting.join(10)
        assert outcome == [504]
        assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_router_queue_full_is_429_and_unavailable_is_503_with_retry_after(demo_model, stream: bool):
    with Harness(demo_model) as h, httpx.Client(base_url=h.url) as client:
        full = client.post("/v1/completions", json={**COMPLETION, "prompt": "#429", "stream": stream})
        assert_429(full)
        assert full.headers["retry-after"] == "1"
        down = client.post("/v1/chat/completions", json={"model": "demo", "stream": stream,
                                                         "messages": [{"role": "user", "content": "#503"}]})
        assert down.status_code == 503 and down.headers["retry-after"] == "1"


def test_prompt_and_max_tokens_limits(demo_model):
    with Harness(demo_model, max_prompt_tokens=8, max_tokens_limit=4) as h, httpx.Client(base_url=h.url) as client:
        def error(path: str, body: dict) -> dict:
            response = client.post(path, json={"model": "demo", **body})
            assert response.status_code == 400, response.text
            return response.json()["error"]

        long_text = "one two three four five six seven eight nine ten"
        assert error("/v1/completions", {"prompt": long_text})["param"] == "prompt"
        assert "at most 8" in error("/v1/completions", {"prompt": list(range(5, 14))})["message"]
        assert error("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]})["param"] == (
            "messages")
        assert error("/v1/completions", {"prompt": "Hi", "max_tokens": 5})["param"] == "max_tokens"
        chat = {"messages": [{"role": "user", "content": "Hi"}]}
        assert error("/v1/chat/completions", {**chat, "max_tokens": 5})["param"] == "max_tokens"
        assert error("/v1/chat/completions", {**chat, "max_completion_tokens": 9})["param"] == "max_completion_tokens"
        assert not h.fake.requests  # all refused before the router
        assert client.post("/v1/completions", json={"model": "demo", "prompt": "Hi"}).status_code == 200
        assert h.fake.requests[-1].sampling.max_tokens == 4  # OpenAI's default of 16, within the limit
        short = client.post("/v1/completions", json={"model": "demo", "prompt": [5, 6], "max_tokens": 4})
        assert short.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_chat_without_max_tokens_gets_the_limit(demo_model):
    with Harness(demo_model, max_tokens_limit=3) as h, httpx.Client(base_url=h.url) as client:
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        events = client.post("/v1/chat/completions", json=body).text.split("\n\n")
        assert events[-2] == "data: [DONE]"
        assert h.fake.requests[-1].sampling.max_tokens == 3
        finish = json.loads(events[-3][len("data: "):])
        assert finish["choices"][0]["finish_reason"] == "length"


def test_values_beyond_the_router_s_integers_are_clamped_or_refused(demo_model):
    with Harness(demo_model) as h, httpx.Client(base_url=h.url) as client:
        response = client.post("/v1/completions", json={**COMPLETION, "top_k": 10**10})
        assert response.status_code == 200  # a k beyond the vocabulary keeps every token
        assert h.fake.requests[-1].sampling.top_k == h.tokenizer.vocab_size
        for field in ("max_tokens", "max_completion_tokens"):
            body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], field: 2**31}
            assert client.post("/v1/chat/completions", json=body).json()["error"]["param"] == field
