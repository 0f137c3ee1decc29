"""The gateway through the official `openai` client, against a scripted fake router."""

from __future__ import annotations

import openai
import pytest

from tests.unit.gateway_fakes import REVISION, Harness, fake_logprob, fake_token


@pytest.fixture(scope="module")
def harness(demo_model):
    with Harness(demo_model) as h:
        yield h


@pytest.fixture
def client(harness: Harness) -> openai.OpenAI:
    harness.fake.requests.clear()
    return openai.OpenAI(base_url=f"{harness.url}/v1", api_key="x", max_retries=0)


def expected_tokens(harness: Harness, ids: list[int], count: int, seed: int | None = None) -> list[int]:
    shift = 1 + (seed % 7 if seed is not None else 0)
    return [fake_token(ids, i, shift, harness.tokenizer.vocab_size) for i in range(count)]


def expected_text(harness: Harness, ids: list[int], count: int, seed: int | None = None) -> str:
    return "".join(harness.tokenizer.decode([t]) for t in expected_tokens(harness, ids, count, seed))


def chat_ids(harness: Harness, messages: list[dict]) -> list[int]:
    text = harness.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return harness.tokenizer.encode(text, add_special_tokens=False)


def sent_by_choice(harness: Harness) -> dict[int, object]:
    return {int(r.request_id.rsplit("-", 1)[1]): r for r in harness.fake.requests}


def test_completion_text_usage_and_envelope(harness: Harness, client: openai.OpenAI):
    result = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=5)
    ids = harness.tokenizer.encode("Once upon a time")
    assert result.choices[0].text == expected_text(harness, ids, 5)
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        len(ids), 5, len(ids) + 5)
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert (result.model, result.system_fingerprint) == ("demo", REVISION)
    sent = harness.fake.requests[-1]
    assert list(sent.prompt_ids) == ids
    assert (sent.sampling.max_tokens, sent.sampling.temperature, sent.sampling.top_p) == (5, 1.0, 1.0)
    assert not sent.sampling.HasField("seed") and not sent.sampling.HasField("logprobs")


def test_completion_defaults_to_16_tokens(harness: Harness, client: openai.OpenAI):
    result = client.completions.create(model="demo", prompt="The dog")
    assert result.usage.completion_tokens == 16
    assert harness.fake.requests[-1].sampling.max_tokens == 16


def test_sampling_parameters_reach_the_router(harness: Harness, client: openai.OpenAI):
    client.completions.create(
        model="demo", prompt="The cat", max_tokens=2, temperature=0.5, top_p=0.75, seed=42, stop=["zz", "yy"],
        presence_penalty=0.5, frequency_penalty=-1.0, user="u1",
        extra_body={"top_k": 7, "stop_token_ids": [9, 10], "ignore_eos": True})
    sampling = harness.fake.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.5, 0.75, 7, 42)
    assert list(sampling.stop) == ["zz", "yy"] and list(sampling.stop_token_ids) == [9, 10]
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.ignore_eos) == (0.5, -1.0, True)


def test_stop_string_ends_the_choice(harness: Harness, client: openai.OpenAI):
    ids = harness.tokenizer.encode("Once upon a time")
    full = expected_text(harness, ids, 6)
    stop = full[3:6]
    result = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6, stop=stop)
    assert result.choices[0].text == full[:3]
    assert result.choices[0].finish_reason == "stop"


def test_several_prompts_and_n_are_prompt_major_with_seeds(harness: Harness, client: openai.OpenAI):
    prompts = [[1, 300, 301, 302], [1, 400, 401]]
    result = client.completions.create(model="demo", prompt=prompts, n=2, max_tokens=3, seed=10)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for choice in result.choices:
        prompt, j = prompts[choice.index // 2], choice.index % 2
        assert choice.text == expected_text(harness, prompt, 3, seed=10 + j)
    assert result.choices[0].text != result.choices[1].text  # seed+i: the choices differ
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4 + 3, 4 * 3)
    sent = sent_by_choice(harness)
    assert {i: sent[i].sampling.seed for i in sent} == {0: 10, 1: 11, 2: 10, 3: 11}
    assert [list(sent[i].prompt_ids) for i in range(4)] == [prompts[0], prompts[0], prompts[1], prompts[1]]


def test_completion_stream_with_usage(harness: Harness, client: openai.OpenAI):
    stream = client.completions.create(model="demo", prompt=["The dog", "A cat"], max_tokens=4, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    texts: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    prompts = ["The dog", "A cat"]
    assert texts == {i: expected_text(harness, harness.tokenizer.encode(p), 4) for i, p in enumerate(prompts)}
    assert finishes == {0: "length", 1: "length"}
    last = chunks[-1]
    assert last.choices == []
    prompt_tokens = len(harness.tokenizer.encode("The dog")) + len(harness.tokenizer.encode("A cat"))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        prompt_tokens, 8, prompt_tokens + 8)


def test_completion_logprobs(harness: Harness, client: openai.OpenAI):
    result = client.completions.create(model="demo", prompt="The dog", max_tokens=3, logprobs=2)
    ids = harness.tokenizer.encode("The dog")
    tokens = expected_tokens(harness, ids, 3)
    logprobs = result.choices[0].logprobs
    texts = [harness.tokenizer.token_text(t) for t in tokens]
    assert logprobs.tokens == texts
    assert logprobs.token_logprobs == [fake_logprob(i) for i in range(3)]
    assert logprobs.text_offset == [0, len(texts[0]), len(texts[0]) + len(texts[1])]
    assert logprobs.top_logprobs[1] == {harness.tokenizer.token_text(tokens[1]): fake_logprob(1),
                                        harness.tokenizer.token_text(tokens[1] + 1): fake_logprob(1) - 1}
    assert harness.fake.requests[-1].sampling.logprobs == 2


def test_completion_echo_prepends_the_prompt(harness: Harness, client: openai.OpenAI):
    result = client.completions.create(model="demo", prompt="The dog", max_tokens=2, echo=True)
    ids = harness.tokenizer.encode("The dog")
    assert result.choices[0].text == "The dog" + expected_text(harness, ids, 2)


def test_chat_completion(harness: Harness, client: openai.OpenAI):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story"}]
    result = client.chat.completions.create(model="demo", messages=messages, max_tokens=4)
    ids = chat_ids(harness, messages)
    assert list(harness.fake.requests[-1].prompt_ids) == ids
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(harness, ids, 4)
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.system_fingerprint == REVISION
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), 4)


def test_chat_text_parts_and_default_max_tokens(harness: Harness, client: openai.OpenAI):
    parts = [{"type": "text", "text": "Tell"}, {"type": "text", "text": "a story"}]
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": parts}])
    ids = chat_ids(harness, [{"role": "user", "content": "Tell\na story"}])
    sent = harness.fake.requests[-1]
    assert list(sent.prompt_ids) == ids
    assert sent.sampling.max_tokens == harness.fake.max_model_len - len(ids)


def test_chat_stream_n2_with_usage(harness: Harness, client: openai.OpenAI):
    messages = [{"role": "user", "content": "Hello there"}]
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=3, n=2, seed=5,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ids = chat_ids(harness, messages)
    content = {0: "", 1: ""}
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert mine[-1].finish_reason == "length" and not mine[-1].delta.content
        assert all(c.finish_reason is None for c in mine[:-1])
        content[index] = "".join(c.delta.content or "" for c in mine)
    assert content == {j: expected_text(harness, ids, 3, seed=5 + j) for j in (0, 1)}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_logprobs(harness: Harness, client: openai.OpenAI):
    messages = [{"role": "user", "content": "Hello"}]
    result = client.chat.completions.create(model="demo", messages=messages, max_tokens=2, logprobs=True,
                                            top_logprobs=3)
    tokens = expected_tokens(harness, chat_ids(harness, messages), 2)
    content = result.choices[0].logprobs.content
    assert [entry.token for entry in content] == [harness.tokenizer.token_text(t) for t in tokens]
    assert [entry.logprob for entry in content] == [fake_logprob(0), fake_logprob(1)]
    assert content[0].bytes == list(content[0].token.encode())
    assert [t.logprob for t in content[1].top_logprobs] == [fake_logprob(1) - k for k in range(3)]
    assert harness.fake.requests[-1].sampling.logprobs == 3


def test_chat_logprobs_without_top(harness: Harness, client: openai.OpenAI):
    result = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=1, logprobs=True)
    assert result.choices[0].logprobs.content[0].top_logprobs == []
    assert harness.fake.requests[-1].sampling.logprobs == 0


def test_errors_reach_the_client_as_exceptions(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="demo", prompt="#429")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert info.value.body["param"] == "tools"
    with pytest.raises(openai.APIError, match="shard 0 went down"):  # an error event mid-stream
        list(client.completions.create(model="demo", prompt="#midfail", max_tokens=5, stream=True))
