"""The AVX512-BF16 pair-dot GEMM: F.linear's values to bfloat16's precision, a row's bits independent of its
call and of the threads, and the layers that use it."""

from __future__ import annotations

import pytest
import torch

from moe_core import bf16_gemm
from moe_core.dtypes import cpu_flags
from moe_core.linear import Linear

needs_bf16 = pytest.mark.skipif(not cpu_flags() >= bf16_gemm.NEEDS, reason="the kernel needs AVX512-BF16")


@pytest.fixture
def forced_on(monkeypatch):
    monkeypatch.setenv("MOE_BF16_GEMM", "1")
    assert bf16_gemm.library() is not None


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 product of the bfloat16 values, the bias added, rounded once to bfloat16."""
    y = x.float() @ weight.float().T
    return (y if bias is None else y + bias).bfloat16()


@needs_bf16
@pytest.mark.parametrize(("n", "k"), [(2816, 512), (512, 1408), (8, 512), (33, 70), (1, 2), (48, 64)])
@pytest.mark.parametrize("rows", [0, 1, 2, 7, 8, 9, 17, 64, 301])
def test_matches_the_float32_product_rounded_once(n, k, rows):
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
def test_strided_rows_are_read_in_place():
    torch.manual_seed(3)
    weight, wide = torch.randn(40, 64).bfloat16(), torch.randn(9, 100).bfloat16()
    x = wide[:, 10:74]  # row stride 100, not 64
    assert not x.is_contiguous()
    pairs = bf16_gemm.pack(weight)
    assert torch.equal(bf16_gemm.matmul(x, pairs, 40), bf16_gemm.matmul(x.contiguous(), pairs, 40))


@needs_bf16
def test_a_row_gets_the_same_bits_whatever_shares_its_call_and_whatever_the_threads():
    torch.manual_seed(4)
    weight = torch.randn(1408, 512).bfloat16()
    pairs, x = bf16_gemm.pack(weight), torch.randn(97, 512).bfloat16()
    alone = torch.cat([bf16_gemm.matmul(x[i:i + 1], pairs, 1408) for i in range(len(x))])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows, start in [(2, 7), (8, 0), (9, 3), (13, 40), (97, 0)]:
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


def test_auto_leaves_amx_cpus_to_onednn(monkeypatch):
    monkeypatch.delenv("MOE_BF16_GEMM", raising=False)
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: bf16_gemm.NEEDS)
    assert bf16_gemm.wanted()
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: bf16_gemm.NEEDS | {"amx_bf16"})
    assert not bf16_gemm.wanted()
    monkeypatch.setenv("MOE_BF16_GEMM", "1")
    assert bf16_gemm.wanted()
    monkeypatch.setattr(bf16_gemm, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert not bf16_gemm.wanted()  # forced on, but the CPU cannot run it
