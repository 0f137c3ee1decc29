"""The sampler draws from the distribution it was given, never a token top-k/top-p removed, and a
seeded row's draw does not depend on the rest of the batch."""

from __future__ import annotations

import torch

from router_service.engine.params import SamplingParams
from router_service.engine.sampler import Sampler
from router_service.engine.sequence import Sequence
from router_service.engine.stop import StopChecker

PROBS = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])


def seq(params: SamplingParams, seed: int | None = None) -> Sequence:
    s = Sequence(request_id="r", prompt_ids=[1], params=params, eos_ids=frozenset(), arrival=0.0, stop=StopChecker([]))
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


def test_draws_follow_the_distribution_and_skip_zero_probabilities():
    sampler = Sampler(seed=0)
    logits = PROBS.log().expand(4000, -1).contiguous()  # log 0 = -inf: those tokens can never come
    tokens, _ = sampler(logits, [seq(SamplingParams(temperature=1.0)) for _ in range(4000)])
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float() / 4000
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts, PROBS, atol=0.03, rtol=0)  # ~4 standard deviations at 4000 draws


def test_top_k_one_is_the_most_likely_token():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    tokens, _ = Sampler(seed=0)(logits, [seq(SamplingParams(temperature=1.5, top_k=1)) for _ in range(16)])
    assert tokens == logits.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_alone_and_in_a_batch():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0)
    alone = [Sampler(seed=s)(logits[2:3], [seq(params, seed=7)])[0][0] for s in (0, 1)]
    batch = [seq(params) for _ in range(5)]
    batch[2] = seq(params, seed=7)
    together, _ = Sampler(seed=3)(logits, batch)
    assert alone == [together[2]] * 2


def test_greedy_rows_take_the_first_of_tied_maxima_and_nan_as_argmax_does():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    logits[1, [7, 30]] = 99.0  # a tie: the first
    logits[2, [4, 9]] = float("nan")  # NaN wins, the first one
    logits[3, [2, 3]] = float("inf")
    logits[4] = 0.0
    greedy = SamplingParams(temperature=0.0)
    tokens, _ = Sampler(seed=0)(logits, [seq(greedy) for _ in range(6)])
    assert tokens == logits.argmax(-1).tolist() and tokens[1:5] == [7, 4, 2, 0]
    mixed, _ = Sampler(seed=0)(logits, [seq(greedy), seq(SamplingParams(temperature=1.0))] * 3)
    assert mixed[0::2] == logits[0::2].argmax(-1).tolist()
