"""Text out of the engine: streamed deltas, stop strings, the threaded loop, the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import torch

from router_service.engine.engine import EngineConfig, EngineObserver
from router_service.engine.loop import EngineLoop
from router_service.engine.params import SamplingParams
from router_service.local import build_local_engine


@pytest.fixture(scope="module")
def engine_and_tokenizer(demo_model):
    return build_local_engine(demo_model, "float32", "cpu", EngineConfig(kv_cache_bytes=16 << 20))


def run(engine, prompt_ids, params):
    request_id = engine.add_request(prompt_ids, params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def test_streamed_text_is_the_decoded_tokens(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    prompt = tok.encode("The river ran past the mill, and")
    outs = run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.9, seed=3, ignore_eos=True))
    tokens = [t for o in outs for t in o.token_ids]
    assert "".join(o.text for o in outs) == tok.decode(tokens)
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 40


def test_stop_string_cuts_exactly(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    prompt = tok.encode("Once upon a time")
    free = "".join(o.text for o in run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0)))
    stop = free[12:15]  # three characters from the middle, likely inside a token
    outs = run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop, "never-there"]))
    assert "".join(o.text for o in outs) == free[: free.index(stop)]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"


def test_chat_template_prompt_runs(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Where is the ship?"}])
    prompt = tok.encode(text, add_special_tokens=False)
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
    outs = run(engine, prompt, SamplingParams(max_tokens=8, temperature=0.0))
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) <= 8


def test_loop_streams_to_threads_and_asyncio(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    prompt = tok.encode("The wind")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [t for o in run(engine, prompt, params) for t in o.token_ids]
    with EngineLoop(engine) as loop:
        sync_tokens = [t for o in loop.stream(prompt, params) for t in o.token_ids]

        async def consume():
            async def one():
                return [t for o in [o async for o in loop.astream(prompt, params)] for t in o.token_ids]
            return await asyncio.gather(*(one() for _ in range(4)))

        async_tokens = asyncio.run(consume())
    assert sync_tokens == expected and async_tokens == [expected] * 4


def test_the_loop_gives_the_engine_thread_its_own_thread_count(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    main = torch.get_num_threads()
    seen: list[int] = []

    class Spy(EngineObserver):
        def on_step(self, engine, scheduled, sampled):
            seen.append(torch.get_num_threads())

    observer, engine.observer = engine.observer, Spy()
    try:
        with EngineLoop(engine, threads=main + 1) as loop:
            list(loop.stream(tok.encode("The"), SamplingParams(max_tokens=2, temperature=0.0)))
    finally:
        engine.observer = observer
    assert seen and set(seen) == {main + 1}
    assert torch.get_num_threads() == main  # the caller's thread keeps its own


def test_closing_a_stream_aborts_and_frees(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    with EngineLoop(engine) as loop:
        stream = loop.stream(tok.encode("The bridge"), SamplingParams(max_tokens=500, temperature=0.0,
                                                                      ignore_eos=True))
        next(stream)
        stream.close()
        follow_up = list(loop.stream(tok.encode("x"), SamplingParams(max_tokens=2, temperature=0.0)))
    assert follow_up[-1].finished
    assert not engine.has_unfinished() and engine.allocator.num_free == engine.kv.num_blocks


def test_cli_generate_streams_an_answer(demo_model):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "moe_serve.cli", "generate", "--model", str(demo_model), "--temperature", "0",
         "--max-tokens", "10", "--dtype", "float32", "The ship"],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The ship") and len(result.stdout.strip()) > len("The ship")
    assert "10 generated, finish: length" in result.stderr


def test_cli_reports_a_missing_model_clearly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moe_serve.cli", "generate", "--model", str(tmp_path / "none"),
                             "hi"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "model folder not found" in result.stderr and "Traceback" not in result.stderr
