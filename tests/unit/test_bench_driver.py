"""The bench's HTTP driver against the gateway on a fake router: tokens and times counted per request."""

from __future__ import annotations

import asyncio

import pytest

from bench.driver import run_load, summarize
from bench.workload import Request
from tests.unit.gateway_fakes import Harness


@pytest.fixture(scope="module")
def harness(demo_model):
    with Harness(demo_model) as h:
        yield h


@pytest.mark.parametrize("choices", [1, 3])
def test_a_request_counts_the_tokens_of_all_its_choices(harness: Harness, choices: int):
    requests = [Request([1, 300, 301], 6), Request([1, 400], 5, repeat=True)]
    results, wall = asyncio.run(run_load(harness.url, "demo", requests, 2, choices=choices))
    assert sorted(r.output_tokens for r in results) == [5 * choices, 6 * choices]
    assert all(r.error is None and 0 < r.ttft < r.e2e for r in results)
    for r in results:  # time per output token of one choice: its tokens after the first
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (r.output_tokens / choices - 1))
    summary = summarize(results, wall)
    assert summary["output_tokens"] == 11 * choices and summary["errors"] == 0
    router_calls = harness.fake.requests[-2 * choices:]  # one per choice
    assert sum(call.sampling.max_tokens == 6 for call in router_calls) == choices
