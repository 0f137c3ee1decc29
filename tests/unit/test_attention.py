"""Decode attention one sequence at a time: same values as the batched call, independent of the batch."""

from __future__ import annotations

import itertools

import pytest
import torch

import moe_core.attention as attention
from moe_core.attention import decode_attention, decode_attention_each, decode_dtype, prefill_attention

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


@pytest.fixture
def cache():
    g = torch.Generator().manual_seed(0)
    pool = 64
    cache_k, cache_v = (torch.randn(pool * BLOCK, KV_HEADS, DIM, generator=g) for _ in range(2))
    return (cache_k, cache_v,
            torch.randperm(pool, generator=g)[:5 * 12].view(5, 12), torch.randn(5, HEADS, DIM, generator=g))


@pytest.mark.parametrize("window", [None, 6])
def test_matches_the_batched_call(cache, window):
    cache_k, cache_v, tables, q = cache
    lengths = [1, 7, 48, 20, 33]
    batched = decode_attention(q, cache_k, cache_v, tables, torch.tensor(lengths), BLOCK, 0.3, window)
    each = decode_attention_each(q, cache_k, cache_v, tables, lengths, BLOCK, 0.3, window)
    torch.testing.assert_close(each, batched, rtol=1e-5, atol=1e-6)


def test_a_sequence_gets_the_same_bits_alone_and_in_any_batch(cache):
    cache_k, cache_v, tables, q = cache
    lengths = [9, 30, 48, 2, 17]
    together = decode_attention_each(q, cache_k, cache_v, tables, lengths, BLOCK, 0.3)
    for i, length in enumerate(lengths):
        alone = decode_attention_each(q[i:i + 1], cache_k, cache_v, tables[i:i + 1, :-(-length // BLOCK)], [length],
                                      BLOCK, 0.3)
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("window", [None, 50])
def test_prefill_rows_do_not_depend_on_where_the_prompt_was_cut(window):
    g = torch.Generator().manual_seed(1)
    n = 150
    q, k, v = (torch.randn(n, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    whole = prefill_attention(q, k, v, 0, 0.3, window, aligned=True)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=_causal(n, window), scale=0.3).transpose(0, 1)
    torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-6)
    for cuts in ([1], [17, 64], [63, 100, 149]):
        bounds = [0, *cuts, n]
        parts = [prefill_attention(q[a:b], k[:b], v[:b], a, 0.3, window, aligned=True)
                 for a, b in itertools.pairwise(bounds)]
        assert torch.equal(torch.cat(parts), whole)


def _causal(n: int, window: int | None) -> torch.Tensor:
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    return allowed & (pos[None, :] > pos[:, None] - window) if window else allowed


def test_bfloat16_decode_matches_float32_and_returns_bfloat16(cache):
    cache_k, cache_v, tables, q = cache
    lengths = [9, 30, 48, 2, 17]
    half = [t.bfloat16() for t in (q, cache_k, cache_v)]
    for out in (decode_attention(half[0], half[1], half[2], tables, torch.tensor(lengths), BLOCK, 0.3),
                decode_attention_each(half[0], half[1], half[2], tables, lengths, BLOCK, 0.3)):
        assert out.dtype == torch.bfloat16
        reference = decode_attention(*(t.float() for t in half), tables, torch.tensor(lengths), BLOCK, 0.3)
        torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("amx", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_bfloat16_decode_computes_in_bfloat16_only_where_the_cpu_has_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(attention, "cpu_has_amx_bf16", lambda: amx)
    assert decode_dtype(torch.zeros(1, dtype=torch.bfloat16)) == expected
    assert decode_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert decode_dtype(torch.zeros(1)) == torch.float32
