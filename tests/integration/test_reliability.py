"""Reliability under load: a replica killed mid-stream, the router drained with SIGTERM, Redis killed."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from moe_core.config import load_config
from moe_core.placement import even_split
from router_service.engine.engine import EngineConfig
from router_service.engine.params import SamplingParams
from router_service.local import build_local_engine
from tests.engine_helpers import drain
from tests.integration.services import Cluster, RedisServer

PROMPTS = [f"Story {i}: once upon a time the {word}" for i, word in
           enumerate(["river", "mill", "ship", "router", "expert", "mountain", "bridge", "farm"] * 8)]


def reference(demo_model, max_tokens: int) -> list[str]:
    engine, tokenizer = build_local_engine(demo_model, "float32", "cpu", EngineConfig(kv_cache_bytes=64 << 20))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    results = drain(engine, {0: [(tokenizer.encode(p), params) for p in PROMPTS]})
    return ["".join(o.text for o in outs) for outs in results.values()]


async def stream_all(url: str, model: str, max_tokens, on_chunk=None) -> list[dict]:
    """Send every prompt as a streaming completion at once; -> per request: status, text, error, finished.

    `max_tokens` is a number, or a function of the prompt's index.
    """
    async def one(client: httpx.AsyncClient, index: int, prompt: str) -> dict:
        tokens = max_tokens(index) if callable(max_tokens) else max_tokens
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        result = {"status": None, "text": "", "error": None, "finished": False}
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            result["status"] = response.status_code
            if response.status_code != 200:
                result["error"] = (await response.aread()).decode()
                return result
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    break
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result["error"] = event["error"]["message"]
                    continue
                for choice in event["choices"]:
                    result["text"] += choice["text"]
                    result["finished"] |= choice.get("finish_reason") is not None
                if on_chunk:
                    on_chunk(result)
        return result

    limits = httpx.Limits(max_connections=len(PROMPTS) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(PROMPTS)))


@pytest.fixture
def cluster2x2(demo_model, tmp_path):
    cluster = Cluster(tmp_path)
    specs = even_split(load_config(demo_model), 2)
    cluster.placement(specs)
    experts = {s.shard_id: [cluster.expert(demo_model, s, r) for r in range(2)] for s in specs}
    cluster.wait(*[e for es in experts.values() for e in es])
    router = cluster.router(demo_model, experts, "--rpc-timeout-s", "20", "--max-num-seqs", "64")
    cluster.wait(router)
    gateway = cluster.gateway(demo_model, [router])
    cluster.wait(gateway)
    yield cluster, experts, router, f"http://127.0.0.1:{gateway.port}"
    cluster.stop()


def test_kill_a_replica_while_64_streams_are_in_flight(cluster2x2, demo_model):
    _cluster, experts, _, url = cluster2x2
    expected = reference(demo_model, 24)
    victim = experts["shard-0"][0]
    chunks = {"n": 0}

    def on_chunk(_result):
        chunks["n"] += 1
        if chunks["n"] == 3 * len(PROMPTS) and victim.process.poll() is None:  # every stream is under way
            victim.process.kill()

    results = asyncio.run(stream_all(url, demo_model.resolve().name, 24, on_chunk))
    assert victim.process.poll() is not None, "the replica was not killed during the run"
    failed = [r for r in results if r["status"] != 200 or r["error"] or not r["finished"]]
    assert not failed, failed[:3]
    assert [r["text"] for r in results] == expected


def test_sigterm_to_the_router_under_load(demo_model, tmp_path):
    cluster = Cluster(tmp_path)
    try:
        router = cluster.router(demo_model, None, "--drain-timeout-s", "2", "--max-num-seqs", "16")
        cluster.wait(router)
        gateway = cluster.gateway(demo_model, [router])
        cluster.wait(gateway)
        url = f"http://127.0.0.1:{gateway.port}"
        state = {"signalled": None}

        def on_chunk(result):  # SIGTERM as soon as the first request has finished: the rest are in flight
            if result["finished"] and state["signalled"] is None:
                state["signalled"] = time.monotonic()
                router.process.send_signal(signal.SIGTERM)

        # 64 requests, 16 at a time in the router: short ones finish during the 2 s drain, long ones cannot.
        results = asyncio.run(stream_all(url, demo_model.resolve().name, lambda i: 8 if i % 2 else 2000, on_chunk))
        router.process.wait(30)
        exited_after = time.monotonic() - state["signalled"]
        completed = [r for r in results if r["status"] == 200 and r["finished"] and not r["error"]]
        cleanly_refused = [r for r in results if r["error"] and ("shutting down" in r["error"]
                                                                 or r["status"] in (503, 429))]
        assert len(completed) + len(cleanly_refused) == len(PROMPTS), [r for r in results if r not in completed
                                                                       and r not in cleanly_refused][:3]
        assert completed and cleanly_refused
        assert exited_after < 3 + 10, f"router took {exited_after:.1f}s to exit after SIGTERM"
        assert router.process.returncode == 0
    finally:
        cluster.stop()


def test_redis_killed_under_load_fails_no_request(demo_model, tmp_path):
    redis_server = RedisServer().start()
    cluster = Cluster(tmp_path)
    try:
        router = cluster.router(demo_model, None, "--cache", "redis", "--redis-url", redis_server.url,
                                "--cache-redis-timeout-ms", "100")
        cluster.wait(router)
        gateway = cluster.gateway(demo_model, [router])
        cluster.wait(gateway)
        chunks = {"n": 0}

        def on_chunk(_result):
            chunks["n"] += 1
            if chunks["n"] == 2 * len(PROMPTS):
                redis_server.process.kill()  # kill -9 mid-run

        url, model = f"http://127.0.0.1:{gateway.port}", demo_model.resolve().name
        results = asyncio.run(stream_all(url, model, 16, on_chunk))
        assert redis_server.process.poll() is not None
        # The router may have run most of its steps before the client counted those chunks, so a second
        # wave follows the kill for sure: its tokens 17-24 are rows that neither tier has seen.
        results += asyncio.run(stream_all(url, model, 24))
        assert all(r["status"] == 200 and r["finished"] and not r["error"] for r in results)
        metrics = httpx.get(f"http://127.0.0.1:{router.ready['metrics_port']}/metrics").text
        errors = [line for line in metrics.splitlines()
                  if line.startswith('moe_expert_cache_requests_total{result="error",tier="redis"}')]
        assert errors and float(errors[0].split()[-1]) > 0
    finally:
        cluster.stop()
        redis_server.stop()
