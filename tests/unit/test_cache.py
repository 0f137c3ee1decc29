"""The expert-output cache: byte bound, keys, and exact reuse in the engine (local tier)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from moe_core.loader import load_dense_model, load_expert_shard
from router_service import row_keys
from router_service.cache import ENTRY_OVERHEAD, CacheConfig, LocalCache, populate, set_commands
from router_service.cached_experts import CachedExperts
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.expert_backend import LocalExperts
from tests.engine_helpers import drain, logprobs, random_prompts, tokens

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)


def _rows(n: int, width: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, width), dtype=np.uint8)


def _d(*names: str) -> np.ndarray:
    """[n, 16] digests standing for the named keys."""
    return np.stack([np.frombuffer(xxhash.xxh3_128_digest(name.encode()), dtype=np.uint8) for name in names])


@pytest.fixture(params=[True, False], ids=["native", "python"])
def use_native(request):
    if request.param and row_keys.library() is None:
        pytest.skip("no C++ compiler here: the native index cannot be built")
    return request.param


def test_local_cache_respects_its_byte_bound_and_evicts_oldest(use_native):
    cache = LocalCache(max_bytes=10 * (100 + ENTRY_OVERHEAD), use_native=use_native)
    rows = _rows(500)
    for i in range(500):
        cache.put_rows(7, _d(f"k{i}"), rows[i:i + 1])
        assert cache.bytes <= cache.max_bytes and len(cache) == min(i + 1, 10)
    assert cache.native == use_native
    found, got = cache.get_rows(7, _d("k0", "k499", "k490", "k489"))
    assert found.tolist() == [1, 2] and (got == rows[[499, 490]]).all()  # the exact bytes, in the order asked
    assert not len(cache.get_rows(8, _d("k499"))[0])  # the same digest at another layer is another key
    big = [f"big{i}" for i in range(25)]
    cache.put_rows(7, _d(*big), _rows(25, seed=1))  # more than the whole budget: the last 10 stay
    assert len(cache) == 10 and cache.get_rows(7, _d("big14", "big15"))[0].tolist() == [1]


def test_local_cache_keeps_what_was_used_last_and_reuses_evicted_slots(use_native):
    cache = LocalCache(max_bytes=3 * (8 + ENTRY_OVERHEAD), use_native=use_native)
    rows = _rows(6, width=8)
    cache.put_rows(0, _d("a", "b", "c"), rows[:3])
    assert cache.get_rows(0, _d("a"))[0].tolist() == [0]  # a hit is the most recently used now: b is the oldest
    cache.put_rows(0, _d("d", "a"), rows[3:5])  # a stored again: same key, new bytes, no eviction for it
    found, before = cache.get_rows(0, _d("a", "b", "c", "d"))  # b was evicted by d; now a is the oldest
    assert found.tolist() == [0, 2, 3] and (before == rows[[4, 2, 3]]).all()
    cache.put_rows(0, _d("e"), rows[5:6])  # evicts a, and e's row goes into a's slot
    found, got = cache.get_rows(0, _d("c", "e", "a", "d"))
    assert found.tolist() == [0, 1, 3] and (got == rows[[2, 5, 3]]).all()
    assert (before == rows[[4, 2, 3]]).all()  # what a lookup returned is its own copy
    with pytest.raises(ValueError, match="8-byte rows"):
        cache.put_rows(0, _d("f"), _rows(1, width=9))
    with pytest.raises(ValueError, match="2 keys"):
        cache.put_rows(0, _d("f", "g"), rows[:1])
    tiny = LocalCache(max_bytes=ENTRY_OVERHEAD, use_native=use_native)  # not one row fits: nothing is stored
    tiny.put_rows(0, _d("a"), rows[:1])
    found, got = tiny.get_rows(0, _d("a"))
    assert not len(found) and got.shape == (0, 8) and tiny.bytes == 0


def test_the_native_index_is_the_python_lru_exactly():
    """Random gets and puts with evictions, repeated keys and several layers: the same slot for every key."""
    if row_keys.library() is None:
        pytest.skip("no C++ compiler here: the native index cannot be built")
    native, python = row_keys.SlotIndex(50), row_keys.SlotIndex(50, use_native=False)
    rng = np.random.default_rng(0)
    pool = _d(*(f"k{i}" for i in range(200)))
    for _ in range(400):
        picked = pool[rng.integers(0, 200, rng.integers(1, 40))]
        layer = int(rng.integers(0, 3))
        op = "get" if rng.random() < 0.5 else "put"
        assert (getattr(native, op)(layer, picked) == getattr(python, op)(layer, picked)).all()
        assert len(native) == len(python)
    assert len(native) == 50


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
    cache.put_rows(0, _d("a", "b", "c"), rows)
    assert (cache.get_rows(0, _d("c", "a"))[1] == rows[[2, 0]]).all()
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
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64).remainder(7)
    x[1] = x[0]
    ids, weights = torch.tensor([[1, 2], [1, 2]]), torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    digests = row_keys.row_digests(x, ids, weights, 0, 2)
    a = row_keys.redis_keys("moe:rev1:3:", digests)
    assert a[0] == a[1] and a[0].startswith("moe:rev1:3:") and len(a[0]) == len("moe:rev1:3:") + 32
    assert row_keys.redis_keys("moe:rev2:3:", digests)[0] != a[0]
    assert row_keys.redis_keys("moe:rev1:4:", digests)[0] != a[0]
    flipped = x.clone()
    flipped[1, 40] = 1.5
    assert row_keys.redis_keys("moe:rev1:3:", row_keys.row_digests(flipped, ids, weights, 0, 2))[1] != a[1]
    other_expert = row_keys.row_digests(x, torch.tensor([[1, 3], [1, 2]]), weights, 0, 2)
    other_weight = row_keys.row_digests(x, ids, torch.tensor([[0.5, 0.5], [0.75, 0.25]]), 0, 2)
    assert not (other_expert[0] == digests[0]).all() and not (other_weight[0] == digests[0]).all()
    assert (row_keys.digests_of_hex(row_keys.hex_of(digests)) == digests).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_rows_digest_is_xxh3_of_its_record_natively_or_not(dtype):
    """The native digests, the Python ones and xxh3-128 of the record's bytes agree, for any span of a step."""
    g = torch.Generator().manual_seed(0)
    n = 24
    x = torch.randn(n, 64, generator=g).to(dtype)
    ids = torch.randint(0, 8, (n, 2), generator=g, dtype=torch.int32)  # any integer type: hashed as int32
    weights = torch.rand(n, 2, generator=g)
    raw = x.view(torch.int16) if dtype == torch.bfloat16 else x
    records = [raw[i].numpy().tobytes() + ids[i].numpy().astype("<i4").tobytes() + weights[i].numpy().tobytes()
               for i in range(n)]
    expected = np.stack([np.frombuffer(xxhash.xxh3_128_digest(r), dtype=np.uint8) for r in records])
    natives = (True, False) if row_keys.library() is not None else (False,)
    for native in natives:
        assert (row_keys.row_digests(x, ids, weights, 0, n, use_native=native) == expected).all()
        assert (row_keys.row_digests(x, ids, weights, 5, 9, use_native=native) == expected[5:9]).all()
        index = row_keys.SlotIndex(100, use_native=native)
        index.put(3, expected[[7]])
        keys = row_keys.lookup_step(index, 3, torch.cat([x, x[:2]]), torch.cat([ids, ids[:2]]),
                                    torch.cat([weights, weights[:2]]), 6, n + 2)
        assert (keys.digests == np.concatenate([expected[6:], expected[:2]])).all()
        assert keys.repeats == 0 and keys.held == 1 and keys.slots.tolist() == [-1, 0] + [-1] * (n - 6)
        doubled = row_keys.lookup_step(index, 3, torch.cat([x, x]), torch.cat([ids, ids]),
                                       torch.cat([weights, weights]), 0, 2 * n)
        assert doubled.repeats == n and doubled.first.tolist() == list(range(n)) * 2 and doubled.held == 1
        assert doubled.slots.tolist() == [-1] * 7 + [0] + [-1] * (2 * n - 8)


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


def test_decode_only_cache_dispatches_prompt_rows_and_skips_a_repeats_decode_rows(parts):
    """`--cache-phases decode`, for one router beside the prefix cache: prompt rows never touch the cache (no key,
    no lookup, no store), and a repeat's decode rows still hit, since prefill stays chunk-invariant."""
    engine, cached = make(parts, phases="decode")
    assert cached.invariant_phases == {"prefill", "decode"}
    prompt = random_prompts(1, 256, seed=8)[0]
    moe_layers = len(parts[0].cfg.moe_layers)
    first = run(engine, prompt)
    assert cached.dispatched_rows == (len(prompt) + PARAMS.max_tokens - 1) * moe_layers
    assert len(cached.local) == (PARAMS.max_tokens - 1) * moe_layers  # decode rows alone were stored
    before, reused = cached.dispatched_rows, engine.scheduler.prefix_hit_tokens
    second = run(engine, prompt)
    reused = engine.scheduler.prefix_hit_tokens - reused  # prompt tokens the prefix cache served
    assert 0 < reused < len(prompt)
    assert cached.dispatched_rows - before == (len(prompt) - reused) * moe_layers  # the rest again, no decode row
    assert tokens(second) == tokens(first) and logprobs(second) == logprobs(first)


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

