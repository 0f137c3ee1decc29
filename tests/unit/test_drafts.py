"""Repeat drafts: a repeated request verifies an earlier output in a few steps, with the same tokens."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from moe_core.loader import load_dense_model, load_expert_shard
from router_service.cache import CacheConfig
from router_service.cached_experts import CachedExperts
from router_service.engine.drafts import draft_key
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.engine.sequence import Sequence
from router_service.engine.stop import StopChecker
from router_service.expert_backend import LocalExperts
from router_service.metrics import EngineMetrics
from tests.engine_helpers import DeferredExperts, drain, logprobs, random_prompts, tokens

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=40, seed=7, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    path = tiny_checkpoint("mixtral-gqa2-top2")
    return load_dense_model(path), LocalExperts(load_expert_shard(path, None)[1])


def make(parts, draft_tokens=4, experts=None, **config) -> Engine:
    model, local = parts
    config = {"kv_cache_bytes": 4 << 20, "block_size": 4, "draft_tokens": draft_tokens, **config}
    return Engine(model, experts or local, None, EngineConfig(**config))


def run_counting_steps(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list, int]:
    request_id = engine.add_request(prompt, params)
    outs, steps = [], 0
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == request_id]
        steps += 1
    return outs, steps


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_repeat_finishes_in_few_steps_with_the_same_tokens_and_logprobs(parts, params):
    prompt = random_prompts(1, 256, seed=11)[0]
    plain_engine = make(parts, draft_tokens=0)
    plain, plain_steps = run_counting_steps(plain_engine, prompt, params)
    plain_again, _ = run_counting_steps(plain_engine, prompt, params)  # its prompt from the prefix cache
    engine = make(parts)
    first, first_steps = run_counting_steps(engine, prompt, params)
    again, again_steps = run_counting_steps(engine, prompt, params)
    assert tokens(first) == tokens(again) == tokens(plain) and len(tokens(plain)) == 20
    assert logprobs(first) == logprobs(plain) and logprobs(again) == logprobs(plain_again)
    assert [lp.top for o in again for lp in o.logprobs] == [lp.top for o in plain_again for lp in o.logprobs]
    assert first_steps == plain_steps
    # the prompt's last token plus 4 draft rows, then 4 draft rows a step: 20 tokens in 4 steps, not 20
    assert again_steps == 4
    assert engine.drafts.accepted == engine.drafts.proposed == 16


def test_a_wrong_draft_costs_rows_never_tokens(parts):
    """Where the draft parts from the truth, the sampled token stands; a seeded request's generator is
    replayed to where the kept rows leave it, so the rest of its output is what it would have been."""
    prompt = random_prompts(1, 256, seed=12)[0]
    truth, _ = run_counting_steps(make(parts, draft_tokens=0), prompt, SEEDED)
    true_ids = tokens(truth)
    engine = make(parts)
    wrong = true_ids[:6] + [(t + 1) % 256 for t in true_ids[6:]]
    engine.drafts._outputs[draft_key(_sequence(prompt, SEEDED))] = wrong  # as if an earlier request had said so
    outs, _ = run_counting_steps(engine, prompt, SEEDED)
    assert tokens(outs) == true_ids and logprobs(outs) == logprobs(truth)
    # drafted and right: tokens 0-3 (step 1, whose last row sampled token 4) and 5 (step 2); 6 was wrong
    assert engine.drafts.accepted == 5 and engine.drafts.proposed > 5


def _sequence(prompt, params) -> Sequence:
    return Sequence("probe", list(prompt), params, frozenset(), 0.0, StopChecker([]))


def test_repeats_beside_other_requests_and_while_the_first_still_runs(parts):
    prompts = random_prompts(6, 256, seed=13)
    mixed = [(p, GREEDY) for p in prompts[:3]] + [(prompts[0], GREEDY), (prompts[1], SEEDED)]
    joins = {0: mixed[:3], 3: mixed[3:], 5: [(prompts[0], GREEDY), (prompts[1], SEEDED)], 9: [(prompts[2], GREEDY)]}
    plain = list(drain(make(parts, draft_tokens=0), joins).values())
    engine = make(parts, draft_tokens=3)
    drafted = list(drain(engine, joins).values())
    assert [tokens(o) for o in drafted] == [tokens(o) for o in plain]
    assert [logprobs(o) for o in drafted] == [logprobs(o) for o in plain]
    assert engine.drafts.accepted >= 10  # a repeat drafts from a running request's output so far, too
    assert engine.allocator.num_free == engine.kv.num_blocks


def test_drafts_go_with_their_sequence_into_overlapped_micro_batches(parts):
    prompts = random_prompts(4, 256, seed=18)
    joins = {0: [(p, GREEDY) for p in prompts], 21: [(p, GREEDY) for p in prompts]}
    plain = list(drain(make(parts, draft_tokens=0), joins).values())
    deferred = DeferredExperts(parts[1])
    engine = make(parts, draft_tokens=4, experts=deferred, overlap=True)
    drafted = list(drain(engine, joins).values())
    assert [tokens(o) for o in drafted] == [tokens(o) for o in plain]
    assert [logprobs(o) for o in drafted] == [logprobs(o) for o in plain]
    assert engine.drafts.accepted == 4 * 16  # each repeat: 20 tokens in 4 steps of a sampled row and 4 drafts


def test_stops_and_lengths_cut_a_drafted_output_where_they_would(parts):
    prompt = random_prompts(1, 256, seed=14)[0]
    engine = make(parts, draft_tokens=8)
    full = tokens(run_counting_steps(engine, prompt, GREEDY)[0])
    short = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    assert tokens(run_counting_steps(engine, prompt, short)[0]) == full[:7]
    stop_at = full[9]
    stopped = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at])
    outs = run_counting_steps(engine, prompt, stopped)[0]
    assert tokens(outs) == full[:full.index(stop_at) + 1] and outs[-1].finish_reason == "stop"
    assert engine.allocator.num_free == engine.kv.num_blocks


def test_preemption_under_a_small_cache_keeps_outputs(parts):
    prompts = random_prompts(6, 256, seed=15, low=20, high=40)
    joins = {0: [(p, GREEDY) for p in prompts], 2: [(p, GREEDY) for p in prompts]}
    small = {"kv_cache_bytes": 48 * 4 * 2 * 2 * 2 * 16 * 4, "max_num_batched_tokens": 32}
    plain = list(drain(make(parts, draft_tokens=0, **small), joins).values())
    engine = make(parts, draft_tokens=6, **small)
    drafted = list(drain(engine, joins).values())
    assert [tokens(o) for o in drafted] == [tokens(o) for o in plain]
    assert engine.drafts.accepted > 0 and engine.scheduler.num_preemptions > 0
    assert engine.allocator.num_free == engine.kv.num_blocks


def test_unseeded_sampling_and_penalties_are_not_drafted(parts):
    prompt = random_prompts(1, 256, seed=16)[0]
    engine = make(parts)
    for params in (SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True),
                   SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, presence_penalty=0.5)):
        run_counting_steps(engine, prompt, params)
        run_counting_steps(engine, prompt, params)
    assert engine.drafts.proposed == 0


def test_draft_rows_hit_the_expert_cache_and_are_counted(parts):
    cached = CachedExperts(parts[1], CacheConfig(mode="local", local_bytes=64 << 20), "rev")
    metrics = EngineMetrics(CollectorRegistry())
    engine = make(parts, draft_tokens=4, experts=cached)
    engine.observer = metrics
    prompt = random_prompts(1, 256, seed=17)[0]
    first, _ = run_counting_steps(engine, prompt, GREEDY)
    dispatched = cached.dispatched_rows
    again, steps = run_counting_steps(engine, prompt, GREEDY)
    assert tokens(again) == tokens(first) and logprobs(again) == logprobs(first)
    assert cached.dispatched_rows == dispatched and steps == 4  # every draft row came from the cache
    assert metrics.drafts_accepted._value.get() == 16 and metrics.drafts_rejected._value.get() == 0
    assert metrics.generation_tokens._value.get() == 40
    assert metrics.prompt_tokens._value.get() == 2 * len(prompt)
