"""Every error the gateway gives: OpenAI's nested shape, the right status, and the offending parameter."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.gateway_fakes import Harness

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def harness(demo_model):
    with Harness(demo_model, max_body_bytes=BODY_LIMIT) as h:
        yield h


@pytest.fixture(scope="module")
def http(harness: Harness):
    with httpx.Client(base_url=harness.url, timeout=30) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def completion(**fields) -> dict:
    return {"model": "demo", "prompt": "Once upon a time", **fields}


def chat(**fields) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], **fields}


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x"}, "model"),
    (completion(temperature=3), "temperature"),
    (completion(temperature="hot"), "temperature"),
    (completion(top_p=0), "top_p"),
    (completion(n=0), "n"),
    (completion(n=17), "n"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(max_tokens=5000), "max_tokens"),
    (completion(logprobs=6), "logprobs"),
    (completion(presence_penalty=2.5), "presence_penalty"),
    (completion(frequency_penalty=-3), "frequency_penalty"),
    (completion(stop=["a"] * 9), "stop"),
    (completion(stop=["a", 3]), "stop[1]"),
    (completion(stop=""), "stop"),
    (completion(stop_token_ids=[10**7]), "stop_token_ids"),
    (completion(seed=2**64), "seed"),
    (completion(prompt=""), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[[1, 2], []]), "prompt"),
    (completion(prompt=["a", 1]), "prompt"),
    (completion(prompt=[1, 10**7]), "prompt"),
    (completion(prompt=[1, -1]), "prompt"),
    (completion(prompt="word " * 3000), "prompt"),
    (completion(prompt=["a"] * 20, n=16), "prompt"),
    (completion(suffix="The end"), "suffix"),
    (completion(logit_bias={"5": 10}), "logit_bias"),
    (completion(best_of=3), "best_of"),
    (completion(echo=True, logprobs=1), "echo"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
     "messages[0].content"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]), "messages"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(tool_choice="auto"), "tool_choice"),
    (chat(functions=[{"name": "f"}]), "functions"),
    (chat(response_format={"type": "json_object"}), "response_format"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
])
def test_bad_requests_name_the_parameter(http: httpx.Client, harness: Harness, body: dict, param: str):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    sent = len(harness.fake.requests)
    error = error_of(http.post(path, json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert len(harness.fake.requests) == sent  # rejected before reaching the router


def test_unsupported_feature_messages(http: httpx.Client):
    error = error_of(http.post("/v1/chat/completions", json=chat(tools=[{"type": "function"}])), 400)
    assert error["message"] == "tools are not supported by this server"
    error = error_of(http.post("/v1/completions", json=completion(echo=True, logprobs=0)), 400)
    assert error["message"] == "echo with logprobs is not supported"
    error = error_of(http.post("/v1/completions", json=completion(suffix="x")), 400)
    assert "suffix" in error["message"]


def test_unknown_fields_and_no_op_values_are_accepted(http: httpx.Client):
    body = chat(metadata={"a": "b"}, brand_new_option=True, tools=[], tool_choice="none",
                response_format={"type": "text"}, logit_bias={}, max_tokens=2)
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"[1, 2]", b"\xff\xfe",
    b'{"model": "demo", "prompt": "a\\ud800b"}',  # unpaired surrogates: no tokenizer or encoder takes them
    b'{"model": "demo", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"model": "demo", "prompt": "a", "stop": ["\\ud800"]}',
    b'{"model": "demo", "prompt": "a", "\\ud800": 1}',
    b'{"model": "demo", "prompt": "a", "tool_choice": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
])
def test_malformed_bodies_are_400(http: httpx.Client, content: bytes):
    response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert error_of(response, 400)["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(http: httpx.Client):
    big = completion(prompt="x" * (BODY_LIMIT + 10))
    error_of(http.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit must hold on the bytes actually read
        data = json.dumps(big).encode()
        for start in range(0, len(data), 8192):
            yield data[start:start + 8192]

    error_of(http.post("/v1/completions", content=chunks()), 413)


def test_unknown_model_is_404(http: httpx.Client):
    for path, body in (("/v1/completions", completion(model="gpt-4")), ("/v1/chat/completions", chat(model="gpt-4"))):
        response = http.post(path, json=body)
        assert response.status_code == 404
        assert response.json() == {"error": {"message": "The model `gpt-4` does not exist.",
                                             "type": "invalid_request_error", "param": "model",
                                             "code": "model_not_found"}}


@pytest.mark.parametrize(("marker", "status", "message"), [
    ("#429", 429, "the router's queue is full"),
    ("#503", 503, "shard 1 has no live replica"),
    ("#400", 400, "prompt is too long for the router"),
    ("#500", 500, None),
])
@pytest.mark.parametrize("stream", [False, True])
def test_router_status_codes(http: httpx.Client, marker: str, status: int, message: str | None, stream: bool):
    error = error_of(http.post("/v1/completions", json=completion(prompt=marker, stream=stream)), status)
    if message is not None:
        assert error["message"] == message
    else:
        assert "secret" not in error["message"] and "Traceback" not in error["message"]


def test_chat_stream_failing_before_the_first_chunk_keeps_its_status(http: httpx.Client):
    body = chat(messages=[{"role": "user", "content": "#503"}], stream=True)
    assert error_of(http.post("/v1/chat/completions", json=body), 503)["code"] == "service_unavailable"


def test_failure_mid_stream_is_an_error_event_then_done(http: httpx.Client):
    response = http.post("/v1/completions", json=completion(prompt="#midfail", max_tokens=8, stream=True))
    assert response.status_code == 200
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] == "shard 0 went down" and error["code"] == "service_unavailable"
    assert all("choices" in json.loads(event) for event in events[:-2])


def test_unknown_route_and_method_use_the_error_shape(http: httpx.Client):
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.get("/v1/completions"), 405)
