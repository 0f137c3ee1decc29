"""Prefix caching: the allocator's block bookkeeping, and the engine skipping the prefill of known prefixes."""

from __future__ import annotations

import pytest
import torch

from moe_core.loader import load_dense_model, load_expert_shard
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.kv_cache import BlockAllocator
from router_service.engine.params import SamplingParams
from router_service.engine.scheduler import _common_blocks
from router_service.expert_backend import LocalExperts, WrappedBackend
from router_service.metrics import EngineMetrics, new_registry
from tests.engine_helpers import drain, logprobs, random_prompts, tokens

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
BS = 4


# -- the allocator ------------------------------------------------------------------------------


def cache_blocks(pool: BlockAllocator, ids: list[int]) -> list[int]:
    """Allocate and register blocks for `ids` as a sequence would, then release them."""
    blocks, parent = pool.allocate(len(ids) // BS), 0
    for i, block in enumerate(blocks):
        parent = pool.register(block, parent, ids[i * BS:(i + 1) * BS])
    pool.free(blocks)
    return blocks


def test_a_prefix_matches_block_by_block_and_only_whole_blocks():
    pool = BlockAllocator(8, BS, prefix_caching=True)
    ids = list(range(100, 112))  # three full blocks
    blocks = cache_blocks(pool, ids)
    assert pool.num_free == 8 and pool.num_cached == 3  # released blocks stay cached and count as free
    assert pool.match([*ids, 7, 8], 14)[0] == blocks
    assert pool.match(ids, 11)[0] == blocks[:2]  # at most max_tokens: the last block would exceed it
    assert pool.match([*ids[:4], 0, *ids[5:]], 12)[0] == blocks[:1]  # one token differs: the chain stops
    assert pool.match([1, *ids[1:]], 12)[0] == []


def test_a_block_is_found_only_after_the_same_prefix():
    """Identical tokens after a different prefix are a different entry (keys are the chain, not the block)."""
    pool = BlockAllocator(8, BS, prefix_caching=True)
    cache_blocks(pool, [1, 2, 3, 4, 5, 6, 7, 8])
    assert pool.match([9, 9, 9, 9, 5, 6, 7, 8], 8)[0] == []


def test_blocks_in_use_are_never_evicted_and_unused_ones_go_oldest_first():
    pool = BlockAllocator(4, BS, prefix_caching=True)
    old = cache_blocks(pool, list(range(8)))  # two cached, unused
    held, _ = pool.match(list(range(8)), 8)
    assert held == old and pool.num_free == 2
    with pytest.raises(MemoryError):
        pool.allocate(3)
    pool.free(held)
    newer = cache_blocks(pool, list(range(50, 58)))
    fresh = pool.allocate(2)  # nothing free: evicts the two least recently released
    assert sorted(fresh) == sorted(old) and pool.match(list(range(8)), 8)[0] == []
    assert pool.match(list(range(50, 58)), 8)[0] == newer


def test_the_same_content_twice_keeps_one_entry():
    pool = BlockAllocator(4, BS, prefix_caching=True)
    a, b = pool.allocate(1), pool.allocate(1)
    assert pool.register(a[0], 0, [1, 2, 3, 4]) == pool.register(b[0], 0, [1, 2, 3, 4])
    pool.free(a + b)
    assert pool.num_cached == 1 and pool.num_free == 4


def test_without_prefix_caching_nothing_is_kept():
    pool = BlockAllocator(4, BS, prefix_caching=False)
    cache_blocks(pool, list(range(8)))
    assert pool.match(list(range(8)), 8) == ([], 0) and pool.num_cached == 0


def test_common_blocks_counts_whole_shared_blocks_up_to_the_limit():
    a = list(range(100, 140))  # ten blocks of 4
    for differ_at, blocks in ((0, 0), (3, 0), (4, 1), (17, 4), (39, 9)):
        b = list(a)
        b[differ_at] = -1
        assert _common_blocks(a, b, 10, BS) == blocks, differ_at
    assert _common_blocks(a, list(a), 10, BS) == 10 and _common_blocks(a, list(a), 6, BS) == 6
    assert _common_blocks(a, a[:22], 5, BS) == 5 and _common_blocks(a, [], 0, BS) == 0


# -- the engine ---------------------------------------------------------------------------------


class RowCounter(WrappedBackend):
    def __init__(self, inner):
        super().__init__(inner)
        self.rows = 0

    def forward(self, layer, x, weights, ids):
        self.rows += x.shape[0]
        return self.inner.forward(layer, x, weights, ids)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    path = tiny_checkpoint("mixtral-gqa2-top2")
    return load_dense_model(path), LocalExperts(load_expert_shard(path, None)[1])


def make(parts, prefix_caching=True, kv_bytes=4 << 20, observer=None, budget=2048):
    model, experts = parts
    counter = RowCounter(experts)
    config = EngineConfig(kv_cache_bytes=kv_bytes, block_size=BS, prefix_caching=prefix_caching,
                          max_num_batched_tokens=budget)
    return Engine(model, counter, None, config, observer), counter


def run(engine, prompt, params=GREEDY):
    return drain(engine, {0: [(prompt, params)]}).popitem()[1]


def test_a_repeated_prompt_prefills_only_its_last_partial_block(parts):
    engine, counter = make(parts)
    moe_layers = len(parts[0].cfg.moe_layers)
    prompt = random_prompts(1, 256, seed=11, low=30, high=31)[0]  # 30 tokens: 7 full blocks + 2
    first = run(engine, prompt)
    rows_first = counter.rows
    second = run(engine, prompt)
    # 28 tokens come from the cache; the last 2 prompt tokens and 7 decode tokens run
    assert counter.rows - rows_first == (2 + GREEDY.max_tokens - 1) * moe_layers
    assert tokens(second) == tokens(first)
    torch.testing.assert_close(torch.tensor(logprobs(second)), torch.tensor(logprobs(first)), atol=1e-4, rtol=0)
    assert engine.allocator.num_free == engine.kv.num_blocks  # everything released, cached blocks reusable


def test_a_shared_system_prompt_is_computed_once(parts):
    engine, counter = make(parts)
    moe_layers = len(parts[0].cfg.moe_layers)
    system = random_prompts(1, 256, seed=12, low=16, high=17)[0]
    a, b = (system + tail for tail in random_prompts(2, 256, seed=13, low=5, high=6))
    run(engine, a)
    before = counter.rows
    out = run(engine, b)
    assert counter.rows - before == (5 + GREEDY.max_tokens - 1) * moe_layers
    reference, _ = make(parts, prefix_caching=False)
    assert tokens(out) == tokens(run(reference, b))


def test_outputs_match_no_prefix_caching_under_eviction_and_preemption(parts):
    """A KV budget far below the load: cached blocks are evicted and sequences preempted while
    repeats and shared prefixes come and go; every output equals the engine without prefix caching."""
    system = random_prompts(1, 256, seed=14, low=12, high=13)[0]
    prompts = [system + p for p in random_prompts(6, 256, seed=15, low=3, high=20)]
    joins = {0: [(p, GREEDY) for p in prompts[:3]], 1: [(p, GREEDY) for p in prompts[3:]],
             6: [(p, GREEDY) for p in prompts[:3]]}
    bytes_per_block = 2 * parts[0].cfg.num_hidden_layers * parts[0].cfg.kv_size * 4 * BS
    cached, _ = make(parts, kv_bytes=24 * bytes_per_block)
    plain, _ = make(parts, prefix_caching=False, kv_bytes=24 * bytes_per_block)
    with_cache = [tokens(r) for r in drain(cached, joins).values()]
    without = [tokens(r) for r in drain(plain, joins).values()]
    assert with_cache == without
    assert cached.scheduler.num_preemptions > 0 and cached.scheduler.prefix_hit_tokens > 0
    assert cached.allocator.num_free == cached.kv.num_blocks


def test_prefix_cache_metrics_count_looked_up_and_reused_tokens(parts):
    registry = new_registry()
    engine, _ = make(parts, observer=EngineMetrics(registry))
    prompt = random_prompts(1, 256, seed=16, low=21, high=22)[0]  # 21 tokens: 5 full blocks + 1
    run(engine, prompt)
    run(engine, prompt)
    assert registry.get_sample_value("moe_prefix_cache_query_tokens_total") == 2 * 20
    assert registry.get_sample_value("moe_prefix_cache_hit_tokens_total") == 20


# -- a prompt that another request is still prefilling --------------------------------------------


def test_requests_with_the_same_prompt_arriving_together_prefill_it_once(parts):
    """A request's n choices, or the same prompt sent four times at once: the first prefills the
    prompt, the others wait one step and take its blocks; the outputs are those of four lone runs."""
    engine, counter = make(parts)
    moe_layers = len(parts[0].cfg.moe_layers)
    prompt = random_prompts(1, 256, seed=17, low=30, high=31)[0]  # 7 full blocks + 2
    results = drain(engine, {0: [(prompt, GREEDY)] * 4})
    decode_rows = 4 * (GREEDY.max_tokens - 1)
    assert counter.rows == (30 + 3 * 2 + decode_rows) * moe_layers  # without the wait: (4 * 30 + ...)
    assert engine.scheduler.prefix_hit_tokens == 3 * 28
    reference, _ = make(parts, prefix_caching=False)
    alone = run(reference, prompt)
    for outs in results.values():
        assert tokens(outs) == tokens(alone)
        torch.testing.assert_close(torch.tensor(logprobs(outs)), torch.tensor(logprobs(alone)), atol=1e-4, rtol=0)
    assert engine.allocator.num_free == engine.kv.num_blocks


def test_a_request_waits_for_a_shared_prefix_in_chunks_while_others_go_ahead(parts):
    """The first prompt's prefill takes two steps of a 32-token budget. A request that is mostly that
    prompt waits for its blocks; one sharing less than half of its own prompt with it is not worth a
    step of latency and goes ahead, from the blocks cached so far."""
    engine, counter = make(parts, budget=32)
    moe_layers = len(parts[0].cfg.moe_layers)
    first, own, more = random_prompts(3, 256, seed=18, low=48, high=49)
    mostly = first[:44] + own[:3]  # 11 of its 12 blocks are the first prompt's
    partly = first[:36] + more[:40]  # 9 of 19 blocks
    for request_id, prompt in (("first", first), ("mostly", mostly), ("partly", partly)):
        engine.add_request(prompt, GREEDY, request_id)
    first_token_step = {}
    for step in range(64):
        for out in engine.step():
            first_token_step.setdefault(out.request_id, step)
        if not engine.has_unfinished():
            break
    # step 0: first 32 tokens; step 1: first 16, partly 16 (8 blocks cached); step 2: partly 28, mostly 3
    assert first_token_step == {"first": 1, "partly": 2, "mostly": 2}
    assert engine.scheduler.prefix_hit_tokens == 32 + 44
    assert counter.rows == (48 + 44 + 3 + 3 * (GREEDY.max_tokens - 1)) * moe_layers


def test_a_waiting_request_goes_on_by_itself_when_the_first_is_aborted(parts):
    engine, _ = make(parts, budget=24)
    prompt = random_prompts(1, 256, seed=20, low=40, high=41)[0]
    engine.add_request(prompt, GREEDY, "first")
    engine.add_request(prompt, GREEDY, "again")
    assert engine.step() == [] and engine.num_waiting == 1  # the first is mid-prefill, the repeat waits
    engine.abort("first")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    reference, _ = make(parts, prefix_caching=False)
    assert tokens(outs) == tokens(run(reference, prompt))
    assert engine.scheduler.prefix_hit_tokens == 24  # the aborted request's first chunk stayed cached
