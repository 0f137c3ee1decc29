"""Grouped expert compute against a plain per-pair loop, on both grouping paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_core.experts import SMALL_PAIRS, UnknownExpertError, expert_forward
from moe_core.linear import Linear
from moe_core.weights import LayerExperts

H, FFN, E = 16, 24, 6


def layer_experts(held: list[int], seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> tuple[LayerExperts, dict[int, tuple]]:
    g = torch.Generator().manual_seed(seed)
    raw = {e: (torch.randn(2 * FFN, H, generator=g).to(dtype), torch.randn(H, FFN, generator=g).to(dtype))
           for e in range(E)}
    local_of = torch.full((E,), -1, dtype=torch.int64)
    local_of[held] = torch.arange(len(held))
    return (LayerExperts(3, held, [Linear(raw[e][0]) for e in held], [Linear(raw[e][1]) for e in held], local_of),
            raw)


def reference(raw, x, ids, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                gate, up = F.linear(x[t], raw[e][0]).chunk(2)
                out[t] += weights[t, j] * F.linear(F.silu(gate) * up, raw[e][1])
    return out


@pytest.mark.parametrize("rows", [1, 5, SMALL_PAIRS // 2 + 7])  # the last one takes the tensor path
def test_matches_a_per_pair_loop(rows):
    experts, raw = layer_experts([0, 2, 3, 5])
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, H, generator=g)
    ids = torch.tensor([0, 2, 3, 5, -1])[torch.randint(0, 5, (rows, 2), generator=g)]
    weights = torch.rand(rows, 2, generator=g)
    assert torch.allclose(expert_forward(experts, x, ids, weights), reference(raw, x, ids, weights), atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, SMALL_PAIRS // 2 + 7])
def test_bfloat16_experts_track_the_per_pair_loop(rows):
    """bfloat16 weights take the pair-dot GEMM where the CPU has AVX512-BF16, oneDNN elsewhere."""
    experts, raw = layer_experts([0, 2, 3, 5], dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, H, generator=g).bfloat16()
    ids = torch.tensor([0, 2, 3, 5, -1])[torch.randint(0, 5, (rows, 2), generator=g)]
    weights = torch.rand(rows, 2, generator=g)
    got = expert_forward(experts, x, ids, weights)
    assert got.dtype == torch.bfloat16
    want = reference({e: (a.float(), b.float()) for e, (a, b) in raw.items()}, x.float(), ids, weights)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * float(want.abs().max()))


@pytest.mark.parametrize("rows", [2, SMALL_PAIRS])
def test_unknown_experts_are_named(rows):
    experts, _ = layer_experts([0, 1])
    ids = torch.zeros(rows, 2, dtype=torch.int64)
    ids[1, 1] = 4
    with pytest.raises(UnknownExpertError, match=r"experts \[4\] are not held here \(held: \[0, 1\]\)"):
        expert_forward(experts, torch.randn(rows, H), ids, torch.rand(rows, 2))


def test_no_pairs_gives_zeros():
    experts, _ = layer_experts([1])
    out = expert_forward(experts, torch.randn(3, H), torch.full((3, 2), -1), torch.rand(3, 2))
    assert torch.equal(out, torch.zeros(3, H))


def test_ffn_parts_add_up_to_the_whole_experts(tiny_checkpoint):
    """Experts loaded in three FFN slices (placement.ffn_split) give partial sums that add up to the whole."""
    from moe_core.checkpoint import Checkpoint
    from moe_core.config import load_config
    from moe_core.weights import load_experts
    from tests.tiny_models import FAMILY_DEFAULT

    path = tiny_checkpoint(FAMILY_DEFAULT["mixtral"])
    cfg = load_config(path)
    layer = cfg.moe_layers[-1]
    whole = load_experts(Checkpoint(path), cfg, None, torch.float32)[layer]
    parts = [load_experts(Checkpoint(path), cfg, None, torch.float32, ffn=(p, 3))[layer] for p in range(3)]
    sizes = [part.down[0].shape[1] for part in parts]
    assert sum(sizes) == cfg.moe_intermediate_size and max(sizes) - min(sizes) <= 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=g)
    want = expert_forward(whole, x, ids, weights)
    got = sum(expert_forward(part, x, ids, weights) for part in parts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
