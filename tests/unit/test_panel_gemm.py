"""The AVX2 panel GEMM: F.linear's values, and a row's bits independent of its call and of the threads."""

from __future__ import annotations

import pytest
import torch

from moe_core import panel_gemm
from moe_core.dtypes import cpu_flags
from moe_core.linear import Linear

pytestmark = pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="the kernel needs AVX2 and FMA")


@pytest.fixture
def forced_on(monkeypatch):
    monkeypatch.setenv("MOE_PANEL_GEMM", "1")
    monkeypatch.setenv("MOE_BF16_GEMM", "0")  # which takes bfloat16 weights first where the CPU has AVX512-BF16
    assert panel_gemm.library() is not None


@pytest.mark.parametrize(("n", "k"), [(2816, 512), (512, 1408), (8, 512), (33, 70), (1, 5)])
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 6, 7, 13, 64, 301])
def test_matches_f_linear(n, k, rows):
    torch.manual_seed(n + k + rows)
    weight, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(rows, k)
    panels = panel_gemm.pack(weight)
    assert panels.shape == (-(-n // 16), k, 16)
    assert torch.equal(panel_gemm.unpack(panels, n), weight)
    tolerance = dict(rtol=1e-5, atol=1e-5 * k ** 0.5 * 4)  # float32 sums of k terms of size ~1
    torch.testing.assert_close(panel_gemm.matmul(x, panels, n, bias), torch.nn.functional.linear(x, weight, bias),
                               **tolerance)
    torch.testing.assert_close(panel_gemm.matmul(x, panels, n), x @ weight.T, **tolerance)


def test_strided_rows_are_read_in_place():
    torch.manual_seed(3)
    weight, wide = torch.randn(40, 64), torch.randn(9, 100)
    x = wide[:, 10:74]  # row stride 100, not 64
    assert not x.is_contiguous()
    assert torch.equal(panel_gemm.matmul(x, panel_gemm.pack(weight), 40), panel_gemm.matmul(x.contiguous(),
                                                                                           panel_gemm.pack(weight), 40))


def test_a_row_gets_the_same_bits_whatever_shares_its_call_and_whatever_the_threads():
    torch.manual_seed(4)
    weight = torch.randn(1408, 512)
    panels, x = panel_gemm.pack(weight), torch.randn(97, 512)
    alone = torch.cat([panel_gemm.matmul(x[i:i + 1], panels, 1408) for i in range(len(x))])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows, start in [(2, 7), (6, 0), (7, 3), (13, 40), (97, 0)]:
                assert torch.equal(panel_gemm.matmul(x[start:start + rows], panels, 1408), alone[start:start + rows])
    finally:
        torch.set_num_threads(before)


def test_linear_uses_panels_when_on_and_onednn_when_off(monkeypatch, forced_on):
    torch.manual_seed(5)
    weight, bias, x = torch.randn(24, 16), torch.randn(24), torch.randn(3, 2, 16)
    on = Linear(weight, bias)
    assert on.panels is not None and on.weight is None and on.dtype == torch.float32
    monkeypatch.setenv("MOE_PANEL_GEMM", "0")
    off = Linear(weight, bias)
    assert off.panels is None
    torch.testing.assert_close(on(x), off(x), rtol=1e-5, atol=1e-5)
    assert on(x).shape == (3, 2, 24)
    assert torch.equal(on.dense(), weight)
    assert Linear(weight.double()).panels is None  # float32 and bfloat16 only


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_bfloat16_weights_give_the_float32_kernel_on_their_widened_values(rows):
    """bfloat16 panels only halve the bytes: the arithmetic is the float32 kernel's, bit for bit."""
    torch.manual_seed(rows)
    weight, bias, x = torch.randn(100, 96).bfloat16(), torch.randn(100), torch.randn(rows, 96)
    half = panel_gemm.pack(weight)
    assert half.dtype == torch.bfloat16 and torch.equal(panel_gemm.unpack(half, 100), weight)
    assert torch.equal(panel_gemm.matmul(x, half, 100, bias), panel_gemm.matmul(x, panel_gemm.pack(weight.float()),
                                                                                100, bias))


def test_a_bfloat16_linear_takes_and_gives_bfloat16(forced_on):
    torch.manual_seed(6)
    weight, x = torch.randn(48, 32).bfloat16(), torch.randn(5, 32).bfloat16()
    layer = Linear(weight)
    assert layer.panels is not None and layer.dtype == torch.bfloat16
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x.float(), weight.float()), rtol=1e-2, atol=1e-2)
