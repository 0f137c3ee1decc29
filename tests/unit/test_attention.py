"""Decode attention in length groups and one sequence at a time: the same values as plain attention over
each sequence's own keys; per sequence, also the same bits whatever else is in the batch."""

from __future__ import annotations

import itertools

import pytest
import torch

import moe_core.attention as attention
from moe_core.attention import decode_attention, decode_attention_each, decode_dtype, decode_groups, prefill_attention

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


@pytest.fixture
def cache():
    g = torch.Generator().manual_seed(0)
    pool = 64
    cache_k, cache_v = (torch.randn(pool * BLOCK, KV_HEADS, DIM, generator=g) for _ in range(2))
    return (cache_k, cache_v,
            torch.randperm(pool, generator=g)[:5 * 12].view(5, 12), torch.randn(5, HEADS, DIM, generator=g))


def batched(q, cache_k, cache_v, tables, lengths, window=None, call_bytes=None):
    groups = decode_groups(tables, lengths, BLOCK, 2 * KV_HEADS * DIM * 4, call_bytes)
    return decode_attention(q, cache_k, cache_v, groups, BLOCK, 0.3, window)


def reference(q, cache_k, cache_v, tables, lengths, window=None):
    """Plain attention of each query over its own sequence's keys, in float64."""
    outs = []
    for i, length in enumerate(lengths):
        slots = (tables[i, :, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[:length]
        k, v = (c[slots].double().repeat_interleave(HEADS // KV_HEADS, 1) for c in (cache_k, cache_v))
        scores = torch.einsum("hd,thd->ht", q[i].double(), k) * 0.3
        if window is not None:
            scores[:, :max(0, length - window)] = float("-inf")
        outs.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    return torch.stack(outs).to(q.dtype)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("call_bytes", [0, 1 << 40])  # a group per length / one group
def test_grouped_and_per_sequence_decode_match_plain_attention(cache, window, call_bytes):
    cache_k, cache_v, tables, q = cache
    lengths = [1, 7, 48, 20, 33]
    expected = reference(q, cache_k, cache_v, tables, lengths, window)
    torch.testing.assert_close(batched(q, cache_k, cache_v, tables, lengths, window, call_bytes), expected,
                               rtol=1e-5, atol=1e-6)
    each = decode_attention_each(q, cache_k, cache_v, tables, lengths, BLOCK, 0.3, window)
    torch.testing.assert_close(each, expected, rtol=1e-5, atol=1e-6)


def test_groups_cover_every_row_once_and_pad_to_whole_blocks():
    tables = torch.arange(6 * 30).view(6, 30)
    lengths = [3, 118, 5, 120, 2, 9]
    many = decode_groups(tables, lengths, BLOCK, 1024, 0)
    rows = torch.cat([g.rows for g in many]).tolist()
    assert sorted(rows) == list(range(6))
    for g in many:
        assert g.keys == BLOCK * g.tables.shape[1] == -(-int(g.lengths.max()) // BLOCK) * BLOCK
        assert torch.equal(g.tables, tables[g.rows, :g.tables.shape[1]])
        assert g.lengths.tolist() == [lengths[r] for r in g.rows.tolist()]
    # short contexts apart from long ones once a call costs less than the padding it saves
    assert len(decode_groups(tables, lengths, BLOCK, 1024, 32 * 1024)) == 2
    one = decode_groups(tables, lengths, BLOCK, 1024, 1 << 40)
    assert len(one) == 1 and one[0].rows is None and one[0].keys == 120
    assert one[0].allowed.sum(1).tolist() == lengths
    assert decode_groups(tables[:2], [16, 16], BLOCK, 1024)[0].allowed is None  # nothing to mask


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
    for out in (batched(half[0], half[1], half[2], tables, lengths),
                decode_attention_each(half[0], half[1], half[2], tables, lengths, BLOCK, 0.3)):
        assert out.dtype == torch.bfloat16
        expected = reference(*(t.float() for t in half), tables, lengths)
        torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("amx", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_bfloat16_decode_computes_in_bfloat16_only_where_the_cpu_has_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(attention, "cpu_has_amx_bf16", lambda: amx)
    assert decode_dtype(torch.zeros(1, dtype=torch.bfloat16)) == expected
    assert decode_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert decode_dtype(torch.zeros(1)) == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_prefill_with_kv_heads_repeated_matches_grouped_heads(dtype):
    """The CUDA path of masked prefill attention (KV heads repeated, so a fused kernel takes the mask) gives
    what grouped heads give: run here on the CPU by asking for it."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 20, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 50, 16, generator=g).to(dtype) for _ in range(2))
    allowed = torch.arange(50)[None, :] <= torch.arange(30, 50)[:, None]
    grouped = attention._masked_sdpa(q, k, v, allowed, 0.25, repeat_kv=False)
    repeated = attention._masked_sdpa(q, k, v, allowed, 0.25, repeat_kv=True)
    torch.testing.assert_close(repeated, grouped, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert not torch.equal(grouped, attention._masked_sdpa(q, k, v, ~allowed | allowed, 0.25, repeat_kv=False))


def test_decode_rows_on_an_accelerator_run_as_one_group(monkeypatch):
    """The length groups' cost model is a CPU's; elsewhere a step's decode rows go in one call."""
    tables, lengths = torch.arange(40).view(4, 10), [10, 150, 20, 155]
    assert len(decode_groups(tables, lengths, 16, 1024, call_bytes=1)) > 1  # on the CPU: cut by length

    class Elsewhere:
        type = "cuda"

    class OnAccelerator(torch.Tensor):
        @property
        def device(self):
            return Elsewhere()

    monkeypatch.setattr(attention, "_group", lambda tables, lengths, members, blocks, size: (members, blocks))
    assert decode_groups(tables.as_subclass(OnAccelerator), lengths, 16, 1024, call_bytes=1) == [(None, 10)]
