"""The one-process engine: continuous batching, preemption, chunked prefill, sampling, errors."""

from __future__ import annotations

import time

import pytest
import torch

from moe_core.errors import CapacityError, RequestError
from moe_core.forward import sequence_logits
from moe_core.loader import load_dense_model, load_expert_shard
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.expert_backend import LocalExperts
from router_service.metrics import EngineMetrics, new_registry
from tests.engine_helpers import DeferredExperts, drain, tokens

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe-shared-dense0-top4")
    model = load_dense_model(path)
    _, experts = load_expert_shard(path, None)
    return model, LocalExperts(experts)


def make_engine(parts, **config) -> Engine:
    model, experts = parts
    return Engine(model, experts, None, EngineConfig(**{"kv_cache_bytes": 4 << 20, "block_size": 4, **config}))


def prompts(n: int, seed: int = 0, low: int = 2, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, 256, (k,), generator=g).tolist() for k in lengths]


def solo(parts, prompt, params=GREEDY) -> list[int]:
    engine = make_engine(parts)
    return tokens(drain(engine, {0: [(prompt, params)]}).popitem()[1])


def test_batched_equals_alone_with_staggered_joins(parts):
    requests = prompts(16)
    alone = [solo(parts, p) for p in requests]
    engine = make_engine(parts)
    joins: dict[int, list] = {}
    for i, p in enumerate(requests):
        joins.setdefault((i * 3) % 11, []).append((p, GREEDY))
    order = sorted(range(16), key=lambda i: (i * 3) % 11)  # the order in which requests join
    results = list(drain(engine, joins).values())
    for position, i in enumerate(order):
        assert tokens(results[position]) == alone[i], f"request {i} differs when batched"
    assert all(len(t) == 20 for t in alone)


def test_preemption_and_chunked_prefill_keep_outputs(parts):
    requests = prompts(8, seed=1)
    alone = [solo(parts, p) for p in requests]
    # 40 blocks of 4 tokens: not enough for all 8 at once, so sequences are preempted and recomputed.
    engine = make_engine(parts, kv_cache_bytes=40 * 4 * 2 * 3 * 2 * 16 * 4, max_num_batched_tokens=16)
    results = drain(engine, {0: [(p, GREEDY) for p in requests]})
    assert engine.scheduler.num_preemptions > 0
    assert [tokens(o) for o in results.values()] == alone
    assert engine.allocator.num_free == engine.kv.num_blocks


def test_seeded_sampling_is_reproducible_and_batch_independent(parts):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    prompt = prompts(1, seed=2)[0]
    first = solo(parts, prompt, params)
    assert first == solo(parts, prompt, params)
    engine = make_engine(parts)
    others = [(p, SamplingParams(max_tokens=10, temperature=1.0)) for p in prompts(5, seed=3)]
    results = list(drain(engine, {0: others[:3], 2: [(prompt, params)], 4: others[3:]}).values())
    assert tokens(results[3]) == first
    assert solo(parts, prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=99)) != first


def test_logprobs_match_reference_logits(parts):
    model, experts = parts
    prompt = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    outs = drain(make_engine(parts), {0: [(prompt, params)]}).popitem()[1]
    generated = tokens(outs)
    reference = torch.log_softmax(sequence_logits(model, experts, prompt + generated), dim=-1)
    for i, out in enumerate(outs):
        (entry,) = out.logprobs
        expected = reference[len(prompt) - 1 + i]
        assert entry.logprob <= 0
        assert entry.logprob == pytest.approx(expected[entry.token_id].item(), abs=1e-5)
        assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely token


def test_stop_token_ids_and_lengths(parts):
    prompt = prompts(1, seed=5)[0]
    free = solo(parts, prompt)
    stop_at = free[5]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at])
    outs = drain(make_engine(parts), {0: [(prompt, params)]}).popitem()[1]
    assert tokens(outs) == free[: free.index(stop_at) + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    outs = drain(make_engine(parts), {0: [(prompt, GREEDY)]}).popitem()[1]
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 20


def test_eos_ends_a_sequence_unless_ignored(parts):
    model, experts = parts
    prompt = prompts(1, seed=6)[0]
    free = solo(parts, prompt)
    eos = free[3]
    engine = Engine(model, experts, None, EngineConfig(kv_cache_bytes=4 << 20, block_size=4))
    engine.eos_ids = frozenset({eos})
    outs = drain(engine, {0: [(prompt, SamplingParams(max_tokens=20, temperature=0.0))]}).popitem()[1]
    assert tokens(outs) == free[: free.index(eos) + 1] and outs[-1].finish_reason == "stop"


def test_bad_requests_are_refused(parts):
    engine = make_engine(parts, max_model_len=64)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(RequestError, match=r"token ids must be integers in \[0, 256\)"):
        engine.add_request([5, 999], GREEDY)
    with pytest.raises(RequestError, match="top_p must be in"):
        engine.add_request([5], SamplingParams(top_p=0.0))
    with pytest.raises(CapacityError, match="maximum context length is 64 tokens"):
        engine.add_request([5] * 60, SamplingParams(max_tokens=10))
    assert not engine.has_unfinished()


def test_abort_frees_the_cache(parts):
    engine = make_engine(parts)
    request_id = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    assert engine.allocator.num_free < engine.kv.num_blocks
    out = engine.abort(request_id)
    assert out.finished and out.finish_reason == "abort"
    assert engine.allocator.num_free == engine.kv.num_blocks and not engine.has_unfinished()


class FailingExperts(LocalExperts):
    def __init__(self, inner: LocalExperts):
        super().__init__(inner.experts)
        self.fail = True

    def forward(self, layer, x, weights, ids):
        if self.fail:
            raise ConnectionError("shard 1 unreachable")
        return super().forward(layer, x, weights, ids)


def test_expert_failure_ends_requests_cleanly(parts):
    model, experts = parts
    failing = FailingExperts(experts)
    engine = Engine(model, failing, None, EngineConfig(kv_cache_bytes=4 << 20, block_size=4))
    results = drain(engine, {0: [(p, GREEDY) for p in prompts(3)]})
    assert all(o[-1].finish_reason == "error" and "shard 1 unreachable" in o[-1].error for o in results.values())
    assert engine.allocator.num_free == engine.kv.num_blocks
    failing.fail = False
    prompt = prompts(1)[0]
    assert tokens(drain(engine, {0: [(prompt, GREEDY)]}).popitem()[1]) == solo(parts, prompt)


def test_overlapped_micro_batches_compute_the_same(parts):
    model, experts = parts
    deferred = DeferredExperts(experts)
    requests = prompts(6, seed=8)
    overlapped = Engine(model, deferred, None, EngineConfig(kv_cache_bytes=4 << 20, block_size=4, overlap=True))
    step, steps = overlapped.step, []
    overlapped.step = lambda: steps.append(1) or step()
    results = list(drain(overlapped, {0: [(p, GREEDY) for p in requests[:4]], 3: [(p, GREEDY) for p in requests[4:]]})
                   .values())
    assert [tokens(r) for r in results] == [solo(parts, p) for p in requests]
    # Every step with two or more sequences went out as two micro-batches: two calls per MoE layer.
    assert deferred.submitted > 1.8 * len(steps) * len(model.cfg.moe_layers)


class ClockedExperts(LocalExperts):
    """Local experts that add up the time their own calls take."""

    def __init__(self, inner: LocalExperts):
        super().__init__(inner.experts)
        self.seconds = 0.0

    def forward(self, layer, x, weights, ids):
        started = time.perf_counter()
        try:
            return super().forward(layer, x, weights, ids)
        finally:
            self.seconds += time.perf_counter() - started


def test_step_metrics_time_each_phase_and_the_experts_share_of_it(parts):
    model, experts = parts
    clocked, registry = ClockedExperts(experts), new_registry()
    engine = Engine(model, clocked, None, EngineConfig(kv_cache_bytes=4 << 20, block_size=4),
                    observer=EngineMetrics(registry))
    prompt = prompts(1, seed=3, low=20, high=21)[0]
    drain(engine, {0: [(prompt, GREEDY)]})
    get = registry.get_sample_value
    # the prompt's one prefill step samples the first token; every other token is a decode step
    assert get("moe_step_duration_seconds_count", {"phase": "prefill"}) == 1
    assert get("moe_step_duration_seconds_count", {"phase": "decode"}) == GREEDY.max_tokens - 1
    experts_seen = 0.0
    for phase in ("prefill", "decode"):
        step_seconds = get("moe_step_duration_seconds_sum", {"phase": phase})
        expert_seconds = get("moe_step_expert_seconds_total", {"phase": phase})
        assert 0 < expert_seconds < step_seconds, phase  # the attention, gates and LM head take the rest
        experts_seen += expert_seconds
    assert clocked.seconds <= experts_seen  # every call the experts made is inside the time counted for them


def test_overlapped_steps_count_the_wait_for_their_experts(parts):
    model, experts = parts
    engine = Engine(model, DeferredExperts(experts), None,
                    EngineConfig(kv_cache_bytes=4 << 20, block_size=4, overlap=True))
    for prompt in prompts(4, seed=9):
        engine.add_request(prompt, GREEDY)
    engine.step()  # four prompts' prefill, as two micro-batches whose experts compute when awaited
    assert 0 < engine.last_step_expert_seconds < engine.last_step_seconds
