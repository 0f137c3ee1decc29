"""Packed linear layers: the bounded set of row counts they run on, and unchanged results, with either
float32 CPU kernel (oneDNN's packed layout, or the AVX2 panel GEMM where the CPU has AVX2)."""

from __future__ import annotations

import pytest
import torch

from moe_core.dtypes import cpu_flags
from moe_core.linear import EXACT_ROWS, ROW_CHUNKS, Linear, row_pieces


@pytest.fixture(autouse=True, params=["onednn", "panels"])
def float32_kernel(request, monkeypatch):
    if request.param == "panels" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("the panel GEMM needs AVX2 and FMA")
    monkeypatch.setenv("MOE_PANEL_GEMM", "1" if request.param == "panels" else "0")
    return request.param


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 127, 128, 200, 255, 256, 257, 513, 1000, 4099])
def test_row_pieces_cover_the_rows_with_few_distinct_sizes(rows):
    pieces = row_pieces(rows)
    assert sum(pieces) == rows
    assert all(p <= EXACT_ROWS or p in ROW_CHUNKS for p in pieces)
    assert pieces == sorted(pieces, reverse=True)  # chunks first, one remainder last


def test_distinct_row_counts_stay_bounded():
    sizes = {p for rows in range(1, 5000) for p in row_pieces(rows)}
    assert len(sizes) <= EXACT_ROWS + len(ROW_CHUNKS)


@pytest.mark.parametrize("rows", [5, 65, 200, 600])
def test_split_calls_give_the_one_call_result(rows, float32_kernel):
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, 48), torch.randn(96)
    x = torch.randn(rows, 48)
    layer = Linear(weight, bias)
    assert (layer.panels is not None) == (float32_kernel == "panels")
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(x.view(1, rows, 48))[0], layer(x), rtol=0, atol=0)  # leading dims kept


@pytest.mark.parametrize("shape", [(512, 1408), (96, 48)])
def test_a_row_gets_the_same_bits_whatever_shares_its_call(shape):
    """The expert-output cache keys rows by their bytes: a row's output must not depend on its batch."""
    torch.manual_seed(1)
    layer = Linear(torch.randn(*shape))
    x = torch.randn(300, shape[1])
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for rows, start in [(2, 7), (3, 0), (17, 100), (64, 200), (65, 30), (129, 171), (300, 0)]:
        assert torch.equal(layer(x[start:start + rows]), alone[start:start + rows])


def test_bfloat16_layers_match_the_plain_kernel():
    """Packed where the CPU has native bf16, plain elsewhere: either way the values of F.linear."""
    torch.manual_seed(2)
    weight, x = torch.randn(96, 48).bfloat16(), torch.randn(70, 48).bfloat16()
    layer = Linear(weight)
    assert layer.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), torch.nn.functional.linear(x, weight).float(), rtol=2e-2, atol=2e-2)


def test_a_bfloat16_model_tracks_the_float32_one(tiny_checkpoint):
    from moe_core.forward import sequence_logits
    from moe_core.loader import load_dense_model, load_expert_shard
    from router_service.expert_backend import LocalExperts

    path = tiny_checkpoint("mixtral-gqa2-top2")
    tokens = list(range(3, 40))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        experts = LocalExperts(load_expert_shard(path, None, dtype)[1])
        logits[dtype] = sequence_logits(load_dense_model(path, dtype), experts, tokens).float()
    agree = (logits[torch.bfloat16].argmax(-1) == logits[torch.float32].argmax(-1)).float().mean()
    assert agree >= 0.9
    assert (logits[torch.bfloat16] - logits[torch.float32]).abs().max() < 0.1 * logits[torch.float32].abs().max()
