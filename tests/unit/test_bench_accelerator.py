"""`python -m bench.accelerator`, the GPU check of the expert FFN against the matmul peak, run on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from bench import accelerator
from moe_core.dtypes import describe_device


def test_reports_every_row_count_for_both_holdings_against_the_measured_peak(tmp_path, capsys):
    out = tmp_path / "accelerator.json"
    assert accelerator.main(["--device", "cpu", "--dtype", "float32", "--hidden", "64", "--ffn", "96",
                             "--experts", "4", "--top-k", "2", "--rows", "1", "16", "--matmul-size", "128",
                             "--copy-mib", "1", "--matmul-calls", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["shape"] == {"hidden_size": 64, "intermediate_size": 96,
                                                             "num_experts": 4, "top_k": 2}
    peak = report["matmul"]["tflops"]
    assert peak > 0 and report["copy_gbs"] > 0
    assert [(r["held"], r["rows"]) for r in report["layers"]] == [(4, 1), (4, 16), (2, 1), (2, 16)]
    for r in report["layers"]:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["weight_gbs"] > 0
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / peak, rel=0.02, abs=1e-4)
        assert 1 <= r["experts_read"] <= r["held"]
        if r["held"] == 4:  # every expert held: both pairs of every row are computed here
            assert r["pairs"] == 2 * r["rows"]
        else:
            assert r["pairs"] <= 2 * r["rows"]
    assert "| 2 of 4 | 16 |" in capsys.readouterr().out


def test_pairs_whose_expert_is_not_held_are_sent_as_minus_one():
    x, ids, weights = accelerator.routed_rows(64, 8, experts=8, top_k=2, held=[0, 1, 2, 3],
                                              dtype=torch.float32, device="cpu")
    assert x.shape == (64, 8) and ids.shape == weights.shape == (64, 2)
    held = ids[ids >= 0]
    assert held.numel() > 0 and int(held.max()) <= 3 and bool((ids < 0).any())
    full = accelerator.routed_rows(64, 8, experts=8, top_k=2, held=list(range(8)), dtype=torch.float32,
                                   device="cpu")[1]
    assert bool((full >= 0).all()) and all(len(set(row)) == 2 for row in full.tolist())  # distinct experts


def test_the_layer_matches_a_plain_computation_of_the_same_experts():
    """What is timed is the real expert FFN: its output is the weighted SwiGLU sum of the routed experts."""
    experts = accelerator.layer_experts(16, 24, 4, [0, 1, 2, 3], torch.float32, "cpu")
    x, ids, weights = accelerator.routed_rows(5, 16, 4, 2, [0, 1, 2, 3], torch.float32, "cpu")
    from moe_core.experts import expert_forward

    got = expert_forward(experts, x, ids, weights)
    want = torch.zeros_like(x)
    for row in range(5):
        for slot in range(2):
            e = int(ids[row, slot])
            gate, up = (x[row] @ experts.gate_up[e].dense().T).chunk(2)
            want[row] += weights[row, slot] * (experts.down[e].dense() @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_cpu_is_described_by_its_name():
    assert describe_device("cpu") == "cpu"
