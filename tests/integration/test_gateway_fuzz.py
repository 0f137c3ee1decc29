"""Fuzzing the gateway from its own /openapi.json with schemathesis, against the fake router.

Every operation gets schema-valid and schema-violating requests (with the right API key, and for about half
of the bodies the served model's name, so that they get past the model check to tokenizing, sampling and
the router). Each response must not be a 5xx and must match the documented status codes, content types,
headers and body schemas. Deterministic (`derandomize`), so CI runs the same cases every time.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.unit.gateway_fakes import Harness

KEY = "sk-fuzz-0123456789"
# Hypothesis max_examples per mode: the generation routes, where the bodies are, get the most.
BODY_EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 60}
OTHER_EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
MIN_CASES = 500


@pytest.fixture(scope="module")
def harness(demo_model):
    # Small output and choice limits keep every generated case fast; the rate limits stay off.
    with Harness(demo_model, api_keys=[KEY], max_tokens_limit=8, max_choices=16, request_timeout_s=10) as h:
        yield h


class Tally:
    """What the fuzzing sent and got back."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.seconds: dict[str, float] = {}
        self.session = requests.Session()


def fuzz(operation: APIOperation, mode: GenerationMode, examples: int, tally: Tally) -> None:
    """`examples` generated requests to one operation, each response checked; none if there is nothing to vary."""
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), served_model=st.booleans())
    def run(case: schemathesis.Case, served_model: bool) -> None:
        if served_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "demo"
        response = case.call(session=tally.session, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        case.validate_response(response, checks=CHECKS)
        tally.cases[operation.label] += 1
        tally.statuses[response.status_code] += 1

    began = time.monotonic()
    try:
        run()
    except Unsatisfiable:  # no parameters and no body: nothing to make invalid
        assert mode == GenerationMode.NEGATIVE, operation.label
    tally.seconds[f"{operation.label} {mode}"] = round(time.monotonic() - began, 1)


def test_fuzz_every_operation_from_the_openapi_schema(harness: Harness):
    schema = schemathesis.openapi.from_url(f"{harness.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                               "GET /v1/models", "GET /v1/models/{model_id}", "GET /healthz"}
    tally = Tally()
    started = time.monotonic()
    for operation in operations:
        for mode, examples in (BODY_EXAMPLES if operation.method.upper() == "POST" else OTHER_EXAMPLES).items():
            fuzz(operation, mode, examples, tally)
    total = sum(tally.cases.values())
    print(f"\n{total} cases in {time.monotonic() - started:.1f} s; by operation {dict(tally.cases)}; "
          f"by status {dict(tally.statuses)}; seconds {tally.seconds}")
    assert total >= MIN_CASES, tally.cases
    assert min(tally.cases["POST /v1/completions"], tally.cases["POST /v1/chat/completions"]) >= 150, tally.cases
    assert tally.statuses[200] > 0 and tally.statuses[400] > 0, tally.statuses  # valid ones got through
    assert httpx.get(f"{harness.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{harness.url}/readyz").status_code == 200
