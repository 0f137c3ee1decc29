"""The expert-output cache: byte bound, keys, and exact reuse in the engine (local tier)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_core.forward import ExpertCall
from moe_core.loader import load_dense_model, load_expert_shard
from router_service.cache import ENTRY_OVERHEAD, CacheConfig, LocalCache, populate, row_keys, set_commands
from router_service.cached_experts import CachedExperts
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.expert_backend import LocalExperts
from tests.engine_helpers import drain, logprobs, random_prompts, tokens

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)


def _rows(n: int, width: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, width), dtype=np.uint8)


def test_local_cache_respects_its_byte_bound_and_evicts_oldest():
    cache = LocalCache(max_bytes=10 * (100 + ENTRY_OVERHEAD))
    rows = _rows(500)
    for i in range(500):
        cache.put_rows([f"k{i}"], rows[i:i + 1])
        assert cache.bytes <= cache.max_bytes and len(cache) == min(i + 1, 10)
    found, got = cache.get_rows(["k0", "k499", "k490", "k489"])
    assert found == [1, 2] and (got == rows[[499, 490]]).all()  # the exact bytes, in the order asked
    cache.put_rows([f"big{i}" for i in range(25)], _rows(25, seed=1))  # more than the whole budget: the last 10 stay
    assert len(cache) == 10 and cache.get_rows(["big14", "big15"])[0] == [1]


def test_local_cache_keeps_what_was_used_last_and_reuses_evicted_slots():
    cache = LocalCache(max_bytes=3 * (8 + ENTRY_OVERHEAD))
    rows = _rows(6, width=8)
    cache.put_rows(["a", "b", "c"], rows[:3])
    assert cache.get_rows(["a"])[0] == [0]  # a hit is the most recently used now: b is the oldest
    cache.put_rows(["d", "a"], rows[3:5])  # a stored again: same key, new bytes, no eviction for it
    found, before = cache.get_rows(["a", "b", "c", "d"])  # b was evicted by d; now a is the oldest
    assert found == [0, 2, 3] and (before == rows[[4, 2, 3]]).all()
    cache.put_rows(["e"], rows[5:6])  # evicts a, and e's row goes into a's slot
    found, got = cache.get_rows(["c", "e", "a", "d"])
    assert found == [0, 1, 3] and (got == rows[[2, 5, 3]]).all()
    assert (before == rows[[4, 2, 3]]).all()  # what a lookup returned is its own copy
    with pytest.raises(ValueError, match="8-byte rows"):
        cache.put_rows(["f"], _rows(1, width=9))
    with pytest.raises(ValueError, match="2 keys"):
        cache.put_rows(["f", "g"], rows[:1])
    tiny = LocalCache(max_bytes=ENTRY_OVERHEAD)  # not one row fits: nothing is stored
    tiny.put_rows(["a"], rows[:1])
    found, got = tiny.get_rows(["a"])
    assert found == [] and got.shape == (0, 8) and tiny.bytes == 0


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_reserved_cache_holds_its_budget_from_the_start():
    cache = LocalCache(max_bytes=64 << 20)
    before = _resident_bytes()
    faulted = cache.reserve(1024)
    assert cache.width == 1024 and cache.capacity == (64 << 20) // (1024 + ENTRY_OVERHEAD) and len(cache) == 0
    if faulted:  # Linux 5.14+: the slab's pages are in memory before any row is stored
        assert _resident_bytes() - before > 50 << 20
    else:
        assert sys.platform != "linux" or not populate(np.empty(1 << 20, dtype=np.uint8))
    rows = _rows(3, width=1024)
    cache.put_rows(["a", "b", "c"], rows)
    assert (cache.get_rows(["c", "a"])[1] == rows[[2, 0]]).all()
    with pytest.raises(ValueError, match="1024-byte rows"):
        cache.reserve(512)


def test_set_commands_are_what_redis_py_would_send():
    import redis

    keys = [f"moe:rev:{layer}:{i:032x}" for i, layer in enumerate([9, 10, 9, 10, 10])]  # two key lengths
    rows = _rows(5, width=6)
    pack = redis.Connection().pack_command
    expected = [b"".join(pack("SET", keys[i], rows[i].tobytes(), "EX", 3600)) for i in (0, 2, 1, 3, 4)]
    assert b"".join(set_commands(keys, rows, 3600)) == b"".join(expected)  # grouped by key length, in order
    accented = ["ab", "éé"]  # one length in characters, not in bytes
    assert b"".join(set_commands(accented, rows[:2], 60)) == b"".join(
        b"".join(pack("SET", key, row.tobytes(), "EX", 60)) for key, row in zip(accented, rows[:2], strict=True))


def test_keys_name_revision_layer_and_exact_bytes():
    record = bytes(range(64)) * 2
    flipped = bytearray(record)
    flipped[100] ^= 1
    a = row_keys("moe:rev1:3:", memoryview(record), 64)
    assert a == row_keys("moe:rev1:3:", memoryview(record), 64) and a[0] == a[1]
    assert row_keys("moe:rev2:3:", memoryview(record), 64)[0] != a[0]
    assert row_keys("moe:rev1:4:", memoryview(record), 64)[0] != a[0]
    assert row_keys("moe:rev1:3:", memoryview(bytes(flipped)), 64)[1] != a[1]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    path = tiny_checkpoint("mixtral-gqa2-top2")
    return load_dense_model(path), LocalExperts(load_expert_shard(path, None)[1])


def make(parts, phases="both", local_bytes=64 << 20):
    model, experts = parts
    cached = CachedExperts(experts, CacheConfig(mode="local", phases=phases, local_bytes=local_bytes), "rev")
    return Engine(model, cached, None, EngineConfig(kv_cache_bytes=4 << 20, block_size=4)), cached


def run(engine, prompt):
    return drain(engine, {0: [(prompt, PARAMS)]}).popitem()[1]


def test_same_prompt_twice_skips_every_expert_row_and_is_identical(parts):
    engine, cached = make(parts)
    prompt = random_prompts(1, 256, seed=3)[0]
    first = run(engine, prompt)
    rows_first = cached.dispatched_rows
    moe_layers = len(parts[0].cfg.moe_layers)
    assert rows_first == (len(prompt) + PARAMS.max_tokens - 1) * moe_layers
    second = run(engine, prompt)
    assert cached.dispatched_rows == rows_first  # the second run dispatched nothing
    assert tokens(second) == tokens(first) and logprobs(second) == logprobs(first)


def test_prefill_only_cache_still_dispatches_decode_rows(parts):
    engine, cached = make(parts, phases="prefill")
    prompt = random_prompts(1, 256, seed=4)[0]
    first = run(engine, prompt)
    before = cached.dispatched_rows
    second = run(engine, prompt)
    moe_layers = len(parts[0].cfg.moe_layers)
    assert cached.dispatched_rows - before == (PARAMS.max_tokens - 1) * moe_layers
    assert tokens(second) == tokens(first)


def test_byte_bound_holds_under_load(parts):
    engine, cached = make(parts, local_bytes=40_000)
    results = drain(engine, {0: [(p, PARAMS) for p in random_prompts(12, 256, seed=5)]})
    assert all(len(tokens(r)) == PARAMS.max_tokens for r in results.values())
    assert 0 < cached.local.bytes <= 40_000


def test_a_repeat_beside_other_requests_dispatches_none_of_its_rows(parts):
    """Decode rows must not depend on what else shares the step, or repeats would miss the cache."""
    engine, cached = make(parts)
    prompt, *others = random_prompts(4, 256, seed=6)
    first = run(engine, prompt)
    before = cached.dispatched_rows
    joined = drain(engine, {0: [(p, PARAMS) for p in others], 3: [(prompt, PARAMS)]})
    moe_layers = len(parts[0].cfg.moe_layers)
    assert cached.dispatched_rows - before == sum(len(p) + PARAMS.max_tokens - 1 for p in others) * moe_layers
    assert tokens(list(joined.values())[-1]) == tokens(first)


def test_identical_rows_in_one_step_are_computed_once(parts):
    engine, cached = make(parts)
    prompt = random_prompts(1, 256, seed=7)[0]
    both = list(drain(engine, {0: [(prompt, PARAMS), (prompt, PARAMS)]}).values())
    moe_layers = len(parts[0].cfg.moe_layers)
    assert cached.dispatched_rows == (len(prompt) + PARAMS.max_tokens - 1) * moe_layers
    assert tokens(both[0]) == tokens(both[1]) and logprobs(both[0]) == logprobs(both[1])


def test_wrappers_keep_the_need_for_invariance(parts):
    """The router puts its metrics wrapper in front of the cache: the engine must still see the need."""
    from router_service.metrics import RoutingRecorder, RoutingStats

    _, cached = make(parts)
    stats = RoutingStats(parts[0].cfg)
    assert RoutingRecorder(cached, stats).invariant_phases == {"prefill", "decode"}
    assert not RoutingRecorder(parts[1], stats).invariant_phases
    assert make(parts, phases="prefill")[1].invariant_phases == {"prefill"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_key_is_the_same_whether_its_step_is_small_or_large(dtype):
    from router_service import cached_experts

    g = torch.Generator().manual_seed(0)
    n = cached_experts.SMALL_ROWS + 8
    call = ExpertCall(3, torch.randn(n, 64, generator=g).to(dtype), torch.rand(n, 2, generator=g),
                      torch.randint(0, 8, (n, 2), generator=g), num_decode=5)
    cache = CachedExperts(LocalExperts({}), CacheConfig(mode="local"), "rev")
    every, later = list(range(n)), list(range(5, n))
    large = cache._keys(call, every)
    assert len(set(large)) == n
    assert cached_experts._small_keys("moe:rev:3:", call, every) == large
    assert cache._keys(call, later) == large[5:]  # a gathered subset keys its rows as before
    small = ExpertCall(3, call.x[:2], call.weights[:2], call.ids[:2])
    assert cache._keys(small, [0, 1]) == large[:2]
