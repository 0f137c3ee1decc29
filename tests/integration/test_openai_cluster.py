"""The main job: `moe-serve up` with 2 expert shards, driven by the official `openai` client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from moe_core.tokenizer import Tokenizer
from router_service.engine.engine import EngineConfig
from router_service.engine.params import SamplingParams
from router_service.local import build_local_engine
from tests.engine_helpers import drain, tokens
from tests.integration.services import moe_serve_up


@pytest.fixture(scope="module")
def up(demo_model, tmp_path_factory):
    with moe_serve_up(demo_model, tmp_path_factory.mktemp("up")) as cluster_and_process:
        yield cluster_and_process

@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up[0]["openai_base_url"], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    return Tokenizer.from_dir(demo_model)


@pytest.fixture(scope="module")
def model_name(demo_model):
    return demo_model.resolve().name


def test_cluster_file_lists_every_service(up):
    cluster, _ = up
    roles = sorted(s["role"] for s in cluster["services"])
    assert roles == ["expert", "expert", "gateway", "router"]
    assert {s.get("shard") for s in cluster["services"] if s["role"] == "expert"} == {"shard-0", "shard-1"}
    assert all(s["port"] > 0 and s["pid"] > 0 for s in cluster["services"])
    assert httpx.get(cluster["url"] + "/readyz").status_code == 200


def test_completion_matches_the_one_process_engine(client, demo_model, model_name, tokenizer):
    prompt = "The river ran past the mill"
    reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=20, temperature=0)
    engine, _ = build_local_engine(demo_model, "float32", "cpu", EngineConfig(kv_cache_bytes=16 << 20))
    expected = drain(engine, {0: [(tokenizer.encode(prompt), SamplingParams(max_tokens=20, temperature=0.0))]})
    (outs,) = expected.values()
    assert reply.choices[0].text == "".join(o.text for o in outs)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == len(tokens(outs))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_and_streaming_of_both(client, model_name, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the ship?"}]
    full = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and full.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert full.usage.prompt_tokens == len(prompt_ids)
    completion_stream = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=10,
                                                  temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in completion_stream if c.choices)
    assert streamed == client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=10,
                                                 temperature=0).choices[0].text


def test_n_seed_and_logprobs(client, model_name):
    def ask(seed):
        return client.completions.create(model=model_name, prompt="The wind", max_tokens=12, n=3, seed=seed,
                                         temperature=1.0, logprobs=2)
    first, again, other = ask(11), ask(11), ask(12)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices] and texts != [c.text for c in other.choices]
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in first.choices)
    for choice in first.choices:
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy takes the best


def test_stop_cuts_the_text(client, model_name):
    free = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=30,
                                     temperature=0).choices[0].text
    stop = free[8:11]
    cut = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=30, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_and_errors(client, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="x " * 3000, max_tokens=10)


def test_sigterm_stops_every_service(up):
    cluster, process = up
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    for service in cluster["services"]:
        with pytest.raises(ProcessLookupError):
            os.kill(service["pid"], 0)


def test_main_job_answers_and_exits(demo_model, tmp_path, tokenizer):
    result = subprocess.run(
        [sys.executable, "-m", "moe_serve.cli", "up", "--model", str(demo_model), "--port", "0", "--run-dir",
         str(tmp_path), "--ask", "Once upon a time", "--max-tokens", "8", "--exit-after-ask"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    prompt_tokens = len(tokenizer.encode("Once upon a time"))
    assert re.search(rf"<<< {prompt_tokens} prompt tokens, [1-8] generated", result.stdout)  # EOS may end it early
