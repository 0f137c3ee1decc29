"""The expert-output cache against a real Redis server (started by the tests on a free port)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import redis

from moe_core.loader import load_dense_model, load_expert_shard
from moe_serve.ports import free_port
from router_service.cache import CacheConfig, RedisCache
from router_service.cached_experts import CachedExperts
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.expert_backend import LocalExperts
from router_service.metrics import new_registry
from tests.engine_helpers import drain, logprobs, random_prompts, tokens
from tests.integration.services import RedisServer

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    path = tiny_checkpoint("olmoe-gqa2-top2")
    return load_dense_model(path), LocalExperts(load_expert_shard(path, None)[1])


def router(parts, url: str, revision: str = "rev-a"):
    """An engine with the cache in redis mode and its own (empty) local tier and metrics."""
    model, experts = parts
    registry = new_registry()
    cached = CachedExperts(experts, CacheConfig(mode="redis", redis_url=url, redis_timeout_s=0.2), revision, registry,
                           model.cfg.moe_layers)
    return Engine(model, cached, None, EngineConfig(kv_cache_bytes=4 << 20, block_size=4)), cached, registry


def count(registry, tier: str, result: str) -> float:
    value = registry.get_sample_value("moe_expert_cache_requests_total", {"tier": tier, "result": result})
    return value or 0.0


def serve(engine, prompts):
    return list(drain(engine, {0: [(p, PARAMS) for p in prompts]}).values())


def served_and_written(parts, url: str, prompts, revision: str = "rev-a"):
    """Serve the prompts on a fresh router and wait until its Redis writes are sent; -> (outputs, its cache)."""
    engine, cache, _ = router(parts, url, revision)
    outputs = serve(engine, prompts)
    cache.redis.flush()
    return outputs, cache


def assert_same_outputs(got, expected) -> None:
    assert [tokens(r) for r in got] == [tokens(r) for r in expected]
    assert [logprobs(r) for r in got] == [logprobs(r) for r in expected]


def test_a_second_router_gets_redis_hits_for_what_the_first_served(parts, server):
    model, _ = parts
    prompts = random_prompts(3, 256, seed=11)
    expected, _ = served_and_written(parts, server.url, prompts)
    client = redis.Redis.from_url(server.url)
    written = client.keys("moe:rev-a:*")
    assert written and all(0 < client.ttl(key) <= 3600 for key in written[:20])
    # one value per token fed (the prompt and every sampled token but the last), under its first MoE layer's key
    assert len(written) == sum(len(p) + PARAMS.max_tokens - 1 for p in prompts)
    assert {key.decode().split(":")[2] for key in written} == {str(model.cfg.moe_layers[0])}
    second, second_cache, registry = router(parts, server.url)
    assert_same_outputs(serve(second, prompts), expected)
    assert second_cache.dispatched_rows == 0
    assert count(registry, "redis", "hit") > 0 and count(registry, "redis", "error") == 0
    # Redis answered at each step's first layer; the later layers found its values in the local tier
    assert count(registry, "local", "hit") == count(registry, "redis", "hit") * (len(model.cfg.moe_layers) - 1)


def test_a_value_serves_a_later_layer_only_where_that_layers_key_matches(parts, server):
    model, _ = parts
    prompts = random_prompts(2, 256, seed=18)
    expected, writer_cache = served_and_written(parts, server.url, prompts)
    client = redis.Redis(port=server.port)
    keys = list(client.scan_iter(match="moe:*"))
    form = writer_cache._form
    at = len(form.head) + 32  # the second MoE layer's key digest in every value
    for key in keys:
        value = bytearray(client.get(key))
        value[at:at + 32] = b"0" * 32
        client.set(key, bytes(value))
    reader, reader_cache, registry = router(parts, server.url)
    assert_same_outputs(serve(reader, prompts), expected)
    # that layer, and only that one, was computed: once per token
    assert reader_cache.dispatched_rows == len(keys) and count(registry, "redis", "hit") == len(keys)
    layers = len(model.cfg.moe_layers)
    assert layers > 2 and count(registry, "local", "hit") == len(keys) * (layers - 2)


def test_new_tokens_ask_redis_at_the_first_layer_only(parts, server):
    model, _ = parts
    layers = len(model.cfg.moe_layers)
    assert layers > 1
    engine, _, registry = router(parts, server.url)
    serve(engine, random_prompts(3, 256, seed=17))
    looked_up_locally = count(registry, "local", "miss") + count(registry, "local", "hit")
    asked_redis = count(registry, "redis", "miss") + count(registry, "redis", "hit")
    # nothing of these prompts is anywhere: every row misses both tiers, and Redis hears of it once per step
    assert count(registry, "local", "hit") == 0 and count(registry, "redis", "hit") == 0
    assert asked_redis > 0 and asked_redis * layers == looked_up_locally


def test_writes_land_with_their_expiry_and_a_refused_one_costs_only_its_rows(server):
    cache = RedisCache(server.url, ttl_s=60, timeout_s=0.5)
    client = redis.Redis(port=server.port)
    try:
        for batch in range(3):  # keys of two lengths in one write (layers 9 and 10), framed apart
            keys = [f"moe:w:{9 + i % 2}:{batch}:{i}" for i in range(50)]
            rows = np.array([[batch, i] * 100 for i in range(50)], dtype=np.uint8)
            cache.put_rows(keys, rows)
            cache.flush()
            assert [client.get(key) for key in keys] == [row.tobytes() for row in rows]
            assert all(0 < client.ttl(key) <= 60 for key in keys)
        client.config_set("maxmemory", 1)  # now the server refuses every SET (out of memory, no eviction)
        refused = [f"moe:refused:{i}" for i in range(10)]
        cache.put_rows(refused, np.zeros((10, 8), dtype=np.uint8))
        cache.flush()
        client.config_set("maxmemory", 0)
        assert client.exists(*refused) == 0  # not stored, and nothing else went wrong:
        assert not cache._warned and cache.available
        cache.put_rows(["moe:after"], np.ones((1, 8), dtype=np.uint8))
        cache.flush()
        assert client.get("moe:after") == bytes([1] * 8)
    finally:
        cache.close()


def test_a_write_to_a_busy_redis_waits_for_it_instead_of_failing_lookups(server):
    """Lookups time out fast (fail-open); the writer, off the serving path, waits out a busy server, so a
    large or delayed write never puts the lookups into their back-off."""
    cache = RedisCache(server.url, ttl_s=60, timeout_s=0.05)
    client = redis.Redis(port=server.port)
    try:
        client.execute_command("CLIENT", "PAUSE", 400, "WRITE")  # writes wait 0.4 s, 8x the lookup timeout
        keys = [f"moe:busy:{i}" for i in range(200)]
        cache.put_rows(keys, np.full((200, 4096), 7, dtype=np.uint8))
        cache.flush()
        assert not cache._warned and cache.available  # the write waited; nothing counted as an outage
        assert client.exists(*keys) == 200 and client.get(keys[0]) == bytes([7] * 4096)
        assert cache.get_many(keys[:2]) == [bytes([7] * 4096)] * 2
    finally:
        cache.close()


def test_redis_stopped_mid_run_then_restarted(parts, server):
    engine, cached, registry = router(parts, server.url)
    prompts = random_prompts(6, 256, seed=12)
    ids = [engine.add_request(p, PARAMS) for p in prompts]
    finished, steps = {}, 0
    while engine.has_unfinished():
        if steps == 3:
            server.stop()  # mid-run: requests are in flight
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        steps += 1
    assert sorted(finished) == sorted(ids) and all(o.finish_reason == "length" for o in finished.values())
    assert count(registry, "redis", "error") > 0
    server.start()  # same port, empty
    other_prompts = iter(random_prompts(40, 256, seed=13))
    deadline = time.monotonic() + 30
    while True:  # hits resume once the back-off has passed: poll for them, each time with a new prompt
        prompt = next(other_prompts)
        serve(engine, [prompt])
        cached.redis.flush()
        reader, _, reader_registry = router(parts, server.url)
        serve(reader, [prompt])
        if count(reader_registry, "redis", "hit") > 0:
            break
        assert time.monotonic() < deadline, "no Redis hits after the restart"
        time.sleep(0.2)


def test_garbage_from_redis_is_an_error_and_computed(parts, server):
    prompts = random_prompts(2, 256, seed=14)
    expected, _ = served_and_written(parts, server.url, prompts)
    client = redis.Redis(port=server.port)
    keys = list(client.scan_iter(match="moe:*"))
    assert keys
    for key in keys:
        client.set(key, b"not a tensor row")
    reader, reader_cache, registry = router(parts, server.url)
    assert [tokens(r) for r in serve(reader, prompts)] == [tokens(r) for r in expected]
    assert count(registry, "redis", "error") == len(keys) and reader_cache.dispatched_rows > 0


def test_revisions_never_collide(parts, server):
    prompts = random_prompts(2, 256, seed=15)
    served_and_written(parts, server.url, prompts, revision="rev-a")
    b, _, registry = router(parts, server.url, revision="rev-b")
    serve(b, prompts)
    assert count(registry, "redis", "hit") == 0 and count(registry, "redis", "miss") > 0
    keys = [k.decode() for k in redis.Redis(port=server.port).scan_iter(match="moe:*")]
    assert {k.split(":")[1] for k in keys} == {"rev-a", "rev-b"}


def test_a_dead_redis_never_fails_a_request(parts):
    engine, _, registry = router(parts, f"redis://127.0.0.1:{free_port()}/0")
    results = serve(engine, random_prompts(3, 256, seed=16))
    assert all(r[-1].finish_reason == "length" for r in results)
    assert count(registry, "redis", "error") > 0


def test_up_needs_a_url_for_redis_mode():
    result = subprocess.run([sys.executable, "-m", "moe_serve.cli", "up", "--cache", "redis"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "--cache redis needs --redis URL" in result.stderr


def test_up_with_redis_serves_repeats_from_the_cache(demo_model, tmp_path, server):
    import json

    import httpx

    process = subprocess.Popen([sys.executable, "-m", "moe_serve.cli", "up", "--model", str(demo_model), "--port", "0",
                                "--run-dir", str(tmp_path), "--redis", server.url, "--dtype", "float32"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "cluster.json").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        cluster = json.loads((tmp_path / "cluster.json").read_text())
        body = {"model": demo_model.resolve().name, "prompt": "The mill by the river", "max_tokens": 6,
                "temperature": 0, "ignore_eos": True}
        texts = [httpx.post(cluster["url"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
                 for _ in range(2)]
        assert texts[0] == texts[1]
        router_metrics = next(s["metrics_url"] for s in cluster["services"] if s["role"] == "router")
        scrape = httpx.get(router_metrics).text
        hits = re.search(r'moe_expert_cache_requests_total\{result="hit",tier="local"\} (\S+)', scrape)
        assert hits and float(hits.group(1)) > 0
        assert redis.Redis(port=server.port).dbsize() > 0  # written through to Redis
    finally:
        process.terminate()
        process.wait(60)


def test_the_bench_counts_the_cpu_of_a_redis_on_this_machine(server):
    from bench.configs import Running, local_redis_pid

    assert local_redis_pid(server.url) == server.process.pid
    running = Running("cluster-2-cache-redis", server.process, {"services": []}, local_redis_pid(server.url))
    client = redis.Redis(port=server.port)
    before = running.cpu_seconds()["redis-server"]
    for batch in range(10):  # its CPU time counts in clock ticks (10 ms): work until one passes
        client.mset({f"k{batch}:{i}": b"x" * 1000 for i in range(20_000)})
        if running.cpu_seconds()["redis-server"] > before:
            break
    assert running.cpu_seconds()["redis-server"] > before
    assert local_redis_pid(f"redis://127.0.0.1:{free_port()}/0") is None
