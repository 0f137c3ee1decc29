"""Decode attention read from the paged cache: SDPA's values, and each sequence's bits its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_core import paged_attention
from moe_core.dtypes import cpu_flags

pytestmark = pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="the kernel needs AVX2 and FMA")
BLOCK = 16


def paged_problem(lengths, heads=8, kv_heads=2, head_dim=64, seed=0):
    """Random caches whose sequences own shuffled blocks, and one query per sequence."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // BLOCK) for n in lengths)
    blocks = torch.randperm(len(lengths) * width + 3, generator=g)
    tables = blocks[:len(lengths) * width].view(len(lengths), width)
    slots = (len(lengths) * width + 3) * BLOCK
    cache_k, cache_v = (torch.randn(slots, kv_heads, head_dim, generator=g) for _ in range(2))
    q = torch.randn(len(lengths), heads, head_dim, generator=g)
    return q, cache_k, cache_v, tables, torch.tensor(lengths)


def reference(q, cache_k, cache_v, tables, lengths, scale, window=None):
    outs = []
    for b, n in enumerate(lengths.tolist()):
        positions = torch.arange(n)
        slots = tables[b, positions // BLOCK] * BLOCK + positions % BLOCK
        if window is not None:
            slots = slots[max(0, n - window):]
        k, v = cache_k[slots].transpose(0, 1), cache_v[slots].transpose(0, 1)  # [kv_heads, n, D]
        outs.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("head_dim", [64, 128, 8, 24])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_matches_sdpa_over_each_sequences_own_keys(head_dim, window):
    lengths = [1, 7, 16, 17, 33, 300, 129]
    q, k, v, tables, lens = paged_problem(lengths, head_dim=head_dim, seed=head_dim)
    scale = head_dim ** -0.5
    got = paged_attention.decode(q, k, v, tables, lens, BLOCK, scale, window)
    torch.testing.assert_close(got, reference(q, k, v, tables, lens, scale, window), rtol=1e-5, atol=2e-6)


def test_multi_query_and_one_head_per_kv_head():
    for heads, kv_heads in ((8, 1), (4, 4)):
        q, k, v, tables, lens = paged_problem([5, 70], heads=heads, kv_heads=kv_heads)
        torch.testing.assert_close(paged_attention.decode(q, k, v, tables, lens, BLOCK, 0.125),
                                   reference(q, k, v, tables, lens, 0.125), rtol=1e-5, atol=2e-6)


def test_a_sequence_gets_the_same_bits_alone_in_any_batch_and_with_any_threads():
    lengths = [3, 90, 17, 250, 64, 1]
    q, k, v, tables, lens = paged_problem(lengths, seed=5)
    alone = [paged_attention.decode(q[i:i + 1], k, v, tables[i:i + 1], lens[i:i + 1], BLOCK, 0.125)
             for i in range(len(lengths))]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            together = paged_attention.decode(q, k, v, tables, lens, BLOCK, 0.125)
            assert all(torch.equal(together[i:i + 1], alone[i]) for i in range(len(lengths)))
    finally:
        torch.set_num_threads(before)


def test_large_scores_stay_finite():
    """The softmax subtracts each head's maximum: scores in the hundreds must not overflow."""
    q, k, v, tables, lens = paged_problem([40, 3])
    got = paged_attention.decode(q * 30, k, v, tables, lens, BLOCK, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q * 30, k, v, tables, lens, 1.0), rtol=1e-4, atol=1e-5)


def test_shapes_that_do_not_fit_are_refused():
    q, k, v, tables, lens = paged_problem([4])
    with pytest.raises(ValueError, match="does not fit"):
        paged_attention.decode(q[:, :7], k, v, tables, lens, BLOCK, 0.125)  # 7 heads over 2 KV heads
    with pytest.raises(ValueError, match="does not fit"):
        paged_attention.decode(q, k, v[:, :, :32], tables, lens, BLOCK, 0.125)


@pytest.mark.parametrize("window", [None, 9])
def test_bfloat16_caches_give_the_float32_kernel_on_their_widened_values(window):
    q, k, v, tables, lens = paged_problem([2, 45, 130], seed=7)
    k16, v16 = k.bfloat16(), v.bfloat16()
    wide = paged_attention.decode(q, k16.float(), v16.float(), tables, lens, BLOCK, 0.125, window)
    assert torch.equal(paged_attention.decode(q, k16, v16, tables, lens, BLOCK, 0.125, window), wide)
    got = paged_attention.decode(q.bfloat16(), k16, v16, tables, lens, BLOCK, 0.125, window)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference(q.bfloat16().float(), k16.float(), v16.float(), tables, lens,
                                                      0.125, window), rtol=1e-2, atol=1e-2)


def test_usable_only_for_cpu_caches_it_reads_with_the_setting_on(monkeypatch):
    q, k, v, *_ = paged_problem([4])
    monkeypatch.setenv("MOE_PAGED_ATTENTION", "1")
    assert paged_attention.usable(q, k, v)
    assert paged_attention.usable(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not paged_attention.usable(q.half(), k.half(), v.half())
    assert not paged_attention.usable(q[..., :12], k[..., :12], v[..., :12])  # head size not a multiple of 8
    monkeypatch.setenv("MOE_PAGED_ATTENTION", "0")
    assert not paged_attention.usable(q, k, v)
