"""The bfloat16 GEMM, on AVX512-BF16's pair dot and on AMX tiles: F.linear's values to bfloat16's precision, a
row's bits independent of its call and of the threads, and the layers that use it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moe_core import bf16_gemm
from moe_core.dtypes import cpu_flags
from moe_core.linear import Linear
from moe_core.model import torch_rms_norm

needs_bf16 = pytest.mark.skipif(not cpu_flags() >= bf16_gemm.NEEDS, reason="the kernel needs AVX512-BF16")
needs_amx = pytest.mark.skipif("amx_bf16" not in cpu_flags(), reason="the AMX path needs AMX-BF16")


@pytest.fixture
def forced_on(monkeypatch):
    monkeypatch.setenv("MOE_BF16_GEMM", "1")
    assert bf16_gemm.library() is not None


@pytest.fixture(params=["pair-dot", pytest.param("amx", marks=needs_amx)])
def path(request):
    """Each GEMM path this CPU has, switched for the test and switched back after."""
    lib = bf16_gemm.library()
    if lib is None:
        pytest.skip("the kernel cannot be built here")
    before = lib.bf16_gemm_set_amx(-1)
    assert lib.bf16_gemm_set_amx(int(request.param == "amx")) == (request.param == "amx")
    yield request.param
    lib.bf16_gemm_set_amx(before)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 product of the bfloat16 values, the bias added, rounded once to bfloat16."""
    y = x.float() @ weight.float().T
    return (y if bias is None else y + bias).bfloat16()


@needs_bf16
@pytest.mark.parametrize(("n", "k"), [(2816, 512), (512, 1408), (8, 512), (33, 70), (1, 2), (48, 64)])
@pytest.mark.parametrize("rows", [0, 1, 2, 7, 8, 9, 16, 17, 32, 33, 64, 301])
def test_matches_the_float32_product_rounded_once(path, n, k, rows):
    torch.manual_seed(n + k + rows)
    weight, bias, x = torch.randn(n, k).bfloat16(), torch.randn(n), torch.randn(rows, k).bfloat16()
    pairs = bf16_gemm.pack(weight)
    assert pairs.shape == (-(-n // 16), k // 2, 16, 2)
    assert torch.equal(bf16_gemm.unpack(pairs, n), weight)
    for b in (None, bias):
        got, want = bf16_gemm.matmul(x, pairs, n, b), reference(x, weight, b)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        # Another order of float32 sums: at most one bfloat16 step apart where the rounding falls otherwise.
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5 * k)
        if rows:
            assert (got == want).float().mean() > 0.9


@needs_bf16
@pytest.mark.parametrize("rows", [9, 40])
def test_strided_rows_are_read_in_place(path, rows):
    torch.manual_seed(3)
    weight, wide = torch.randn(40, 64).bfloat16(), torch.randn(rows, 100).bfloat16()
    x = wide[:, 10:74]  # row stride 100, not 64
    assert not x.is_contiguous()
    pairs = bf16_gemm.pack(weight)
    assert torch.equal(bf16_gemm.matmul(x, pairs, 40), bf16_gemm.matmul(x.contiguous(), pairs, 40))


@needs_bf16
def test_a_row_gets_the_same_bits_whatever_shares_its_call_and_whatever_the_threads(path):
    torch.manual_seed(4)
    weight = torch.randn(1408, 512).bfloat16()
    pairs, x = bf16_gemm.pack(weight), torch.randn(97, 512).bfloat16()
    alone = torch.cat([bf16_gemm.matmul(x[i:i + 1], pairs, 1408) for i in range(len(x))])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows, start in [(2, 7), (8, 0), (9, 3), (13, 40), (16, 1), (32, 17), (33, 5), (97, 0)]:
                assert torch.equal(bf16_gemm.matmul(x[start:start + rows], pairs, 1408), alone[start:start + rows])
    finally:
        torch.set_num_threads(before)


@needs_bf16
def test_linear_uses_it_for_bfloat16_weights_when_on(monkeypatch, forced_on):
    torch.manual_seed(5)
    weight, bias, x = torch.randn(24, 16).bfloat16(), torch.randn(24).bfloat16(), torch.randn(3, 2, 16).bfloat16()
    on = Linear(weight, bias)
    assert on.pairs is not None and on.weight is None and on.dtype == torch.bfloat16
    y = on(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 2, 24)
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, weight, bias).float(), rtol=2 ** -7, atol=1e-3)
    assert torch.equal(on.dense(), weight)
    assert Linear(weight.float()).pairs is None  # bfloat16 weights only
    assert Linear(torch.randn(24, 15).bfloat16()).pairs is None  # k in pairs: an odd width stays with oneDNN
    monkeypatch.setenv("MOE_BF16_GEMM", "0")
    assert Linear(weight, bias).pairs is None


def test_auto_leaves_amx_cpus_to_onednn_only_without_the_tile_state(monkeypatch):
    monkeypatch.delenv("MOE_BF16_GEMM", raising=False)
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: bf16_gemm.NEEDS)
    assert bf16_gemm.wanted()
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: bf16_gemm.NEEDS | {"amx_bf16"})
    monkeypatch.setattr(bf16_gemm, "amx", lambda: True)
    assert bf16_gemm.wanted()
    monkeypatch.setattr(bf16_gemm, "amx", lambda: False)  # the OS refused the tiles, or MOE_BF16_AMX=0
    assert not bf16_gemm.wanted()
    monkeypatch.setenv("MOE_BF16_GEMM", "1")
    assert bf16_gemm.wanted()
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert not bf16_gemm.wanted()  # forced on, but the CPU cannot run it


@needs_amx
@pytest.mark.parametrize(("setting", "amx"), [(None, True), ("0", False)])
def test_an_amx_cpu_runs_the_tiles_unless_told_not_to(setting, amx):
    """Chosen once per process, at load: a fresh interpreter for each setting."""
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_BF16_AMX", "MOE_BF16_GEMM")}
    if setting is not None:
        env["MOE_BF16_AMX"] = setting
    script = ("import torch; from moe_core import bf16_gemm; from moe_core.linear import Linear; "
              "print(bf16_gemm.amx(), bf16_gemm.wanted(), Linear(torch.randn(64, 64).bfloat16()).pairs is not None)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == [str(amx)] * 3  # without the tiles an AMX CPU's matmuls stay with oneDNN


def _layer(held: list[int], experts: int, hidden: int, inter: int, seed: int, bias: bool = False):
    from moe_core.weights import LayerExperts

    g = torch.Generator().manual_seed(seed)
    local_of = torch.full((experts,), -1, dtype=torch.int64)
    local_of[held] = torch.arange(len(held))
    gate_up = [Linear((torch.randn(2 * inter, hidden, generator=g) * 0.05).bfloat16(),
                      torch.randn(2 * inter, generator=g).bfloat16() if bias else None) for _ in held]
    down = [Linear((torch.randn(hidden, inter, generator=g) * 0.05).bfloat16()) for _ in held]
    return LayerExperts(0, held, gate_up, down, local_of)


def _torch_ops(layer, x, ids, weights, counts):
    """`expert_forward` over the same layer with the native call taken away: the torch ops it replaces."""
    from moe_core.experts import expert_forward

    kernel, layer.kernel = layer.kernel, None
    try:
        return expert_forward(layer, x, ids, weights, counts)
    finally:
        layer.kernel = kernel


@needs_bf16
@pytest.mark.parametrize(("experts", "k", "held", "hidden", "inter"), [
    (8, 2, list(range(8)), 512, 1408),  # bench-s, one process
    (8, 2, [0, 1, 2, 3], 512, 704),  # half of each expert's FFN on a shard
    (16, 4, [1, 3, 5, 7, 9], 96, 40),  # a row's four pairs summed in expert order
    (60, 6, list(range(0, 60, 3)), 64, 24),
    (8, 8, list(range(8)), 64, 48),
])
@pytest.mark.parametrize("rows", [1, 3, 8, 33, 300])
def test_one_call_per_layer_gives_the_torch_ops_bits(forced_on, path, experts, k, held, hidden, inter, rows):
    """Grouping, SwiGLU and the weighted sum in one native call: the same bits and per-expert counts as
    the grouped torch ops, on one thread and two."""
    from moe_core.experts import expert_forward

    layer = _layer(held, experts, hidden, inter, seed=rows + k)
    assert layer.kernel is not None
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(rows)])
    ids = torch.where(torch.isin(ids, torch.tensor(held)), ids, torch.full_like(ids, -1))  # -1: another shard's
    weights = torch.rand(rows, k, generator=g)
    want_counts = [0] * experts
    want = _torch_ops(layer, x, ids, weights, want_counts)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            counts = [0] * experts
            got = expert_forward(layer, x, ids, weights, counts)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, hidden)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
            assert counts == want_counts
    finally:
        torch.set_num_threads(before)


@needs_bf16
def test_one_call_rounds_tiny_and_huge_values_as_torch_does(forced_on, path):
    """Denormal sums, SwiGLU products in bfloat16's denormals, overflow and NaN rows come out as the torch
    ops give them (NaN as torch's vectorised conversion writes it)."""
    from moe_core.experts import expert_forward

    layer = _layer([0, 1, 2, 3], 4, 64, 32, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 64, generator=g)
    x[1] *= 1e-19  # the SwiGLU products fall into bfloat16's denormals
    x[2] *= 1e30  # e^-x overflows
    x[3] *= -1e30
    x[4, 5] = float("nan")
    x = x.bfloat16()
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3], [2, 0]])
    weights = torch.rand(7, 2, generator=g)
    weights[5, 0] = 1e-38  # one denormal product in a normal sum
    weights[6] = 1e-37  # denormal sums
    want = _torch_ops(layer, x, ids, weights, None)
    got = expert_forward(layer, x, ids, weights)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    tiny = torch.finfo(torch.bfloat16).tiny
    assert bool(((want[6] != 0) & (want[6].abs() < tiny)).any()) and bool(want[4].isnan().any())  # cases reached


@needs_bf16
def test_one_call_leaves_unknown_experts_to_the_error_path(forced_on):
    from moe_core.experts import UnknownExpertError, expert_forward

    layer = _layer([0, 1], 6, 32, 16, seed=3)
    ids = torch.tensor([[0, 1], [1, 4]])
    assert layer.kernel(torch.randn(2, 32).bfloat16(), ids, torch.rand(2, 2)) is None
    with pytest.raises(UnknownExpertError, match=r"experts \[4\] are not held here \(held: \[0, 1\]\)"):
        expert_forward(layer, torch.randn(2, 32).bfloat16(), ids, torch.rand(2, 2))


@needs_bf16
def test_one_call_only_where_every_weight_is_on_the_kernel(monkeypatch, forced_on):
    assert _layer([0, 1], 2, 32, 16, seed=4).kernel is not None
    assert _layer([0, 1], 2, 32, 16, seed=4, bias=True).kernel is None  # a bias: the torch ops add it
    monkeypatch.setenv("MOE_BF16_GEMM", "0")
    assert _layer([0, 1], 2, 32, 16, seed=4).kernel is None  # oneDNN's weights


@needs_bf16
@pytest.mark.parametrize("h", [512, 64, 40, 7])
@pytest.mark.parametrize("rows", [0, 1, 5, 300])
def test_rms_norm_in_one_pass_rounds_as_the_torch_ops(h, rows):
    """The same roundings as Hugging Face's RMSNorm; only the sum of squares runs in another order, which
    can move a row's scale by a float32 ulp and so a value by at most one bfloat16 step, rarely."""
    g = torch.Generator().manual_seed(h + rows)
    x, weight = (torch.randn(rows, h, generator=g) * 3).bfloat16(), torch.randn(h, generator=g).bfloat16()
    got, want = bf16_gemm.rms_norm(x, weight, 1e-6), torch_rms_norm(x, weight, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, h)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)
    if rows:
        assert (got == want).float().mean() > 0.99


@needs_bf16
def test_rms_norm_reads_strided_and_per_head_rows_and_each_row_alone():
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(37, 96 + 2 * 32, generator=g).bfloat16()
    q = qkv[:, :96]  # OLMoE's norm over the whole query projection: rows 160 apart
    weight = torch.randn(96, generator=g).bfloat16()
    assert torch.equal(bf16_gemm.rms_norm(q, weight, 1e-5), bf16_gemm.rms_norm(q.contiguous(), weight, 1e-5))
    heads = q.reshape(37, 6, 16)  # Qwen3-MoE's norm per head
    per_head = bf16_gemm.rms_norm(heads, weight[:16], 1e-5)
    assert per_head.shape == (37, 6, 16)
    assert torch.equal(per_head[:, 2], bf16_gemm.rms_norm(heads[:, 2].contiguous(), weight[:16], 1e-5))
    alone = torch.cat([bf16_gemm.rms_norm(q[i:i + 1], weight, 1e-5) for i in range(37)])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(bf16_gemm.rms_norm(q, weight, 1e-5), alone)
    finally:
        torch.set_num_threads(before)
    nan = q.clone()
    nan[3, 5] = float("nan")
    out = bf16_gemm.rms_norm(nan, weight, 1e-5)
    assert out[3].isnan().all() and torch.equal(out[4], alone[4])  # a NaN spoils its own row only


@needs_bf16
def test_the_model_norm_takes_the_one_pass_for_bfloat16_only(monkeypatch):
    from moe_core import model

    calls = []
    monkeypatch.setattr(bf16_gemm, "norm_wanted", lambda: True)
    monkeypatch.setattr(bf16_gemm, "rms_norm", lambda x, w, eps: calls.append(x.dtype) or torch_rms_norm(x, w, eps))
    x, weight = torch.randn(3, 16), torch.randn(16)
    model.rms_norm(x.bfloat16(), weight.bfloat16(), 1e-5)
    model.rms_norm(x, weight, 1e-5)
    model.rms_norm(x.bfloat16(), weight, 1e-5)  # a float32 weight: torch's ops
    assert calls == [torch.bfloat16]
    monkeypatch.setattr(bf16_gemm, "norm_wanted", lambda: False)
    model.rms_norm(x.bfloat16(), weight.bfloat16(), 1e-5)
    assert calls == [torch.bfloat16]
