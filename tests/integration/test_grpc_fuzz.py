"""Random and truncated protobuf bytes to the expert and router services: clear errors, servers alive."""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_core import codec
from moe_core.config import load_config
from moe_core.pb import expert_pb2, router_pb2
from moe_core.placement import ShardSpec
from moe_core.revision import model_revision

NAME = "mixtral-gqa2-top2"
# Codes a malformed or nonsensical request may get; never a crash (which would be UNAVAILABLE).
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def services(tiny_checkpoint, tmp_path_factory):
    from tests.integration.services import Cluster

    path = tiny_checkpoint(NAME)
    cluster = Cluster(tmp_path_factory.mktemp("fuzz"))
    spec = ShardSpec("shard-0", [(layer, e) for layer in range(3) for e in range(4)])
    cluster.placement([spec])
    expert = cluster.expert(path, spec, 0)
    cluster.wait(expert)
    router = cluster.router(path, {"shard-0": [expert]})
    cluster.wait(router)
    channels = [grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in (expert, router)]
    yield path, channels
    for channel in channels:
        channel.close()
    cluster.stop()


def valid_expert_request(path) -> bytes:
    cfg = load_config(path)
    return expert_pb2.ExpertRequest(
        model_revision=model_revision(path), layer=1, hidden=codec.encode(torch.randn(3, cfg.hidden_size)),
        expert_ids=codec.encode(torch.tensor([[0, 1]] * 3, dtype=torch.int32)),
        expert_weights=codec.encode(torch.full((3, 2), 0.5))).SerializeToString()


def call(channel, method: str, payload: bytes, stream: bool = False):
    if stream:
        return list(channel.unary_stream(method)(payload, timeout=10))
    return channel.unary_unary(method)(payload, timeout=10)


def check_refused_or_answered(channel, method: str, payload: bytes, stream: bool = False) -> None:
    try:
        call(channel, method, payload, stream)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details())


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_to_the_expert_service(services, payload):
    _, (expert, _) = services
    check_refused_or_answered(expert, "/moe.v1.ExpertService/Forward", payload)


@FUZZ
@given(st.data())
def test_truncated_and_flipped_expert_requests(services, data):
    path, (expert, _) = services
    good = valid_expert_request(path)
    cut = data.draw(st.integers(0, len(good)))
    payload = bytearray(good[:cut])
    if payload and data.draw(st.booleans()):
        payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
    check_refused_or_answered(expert, "/moe.v1.ExpertService/Forward", bytes(payload))


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_to_the_router(services, payload):
    _, (_, router) = services
    check_refused_or_answered(router, "/moe.v1.RouterService/Generate", payload, stream=True)


def test_both_still_serve_after_the_fuzzing(services):
    path, (expert, router) = services
    reply = expert_pb2.ExpertResponse.FromString(call(expert, "/moe.v1.ExpertService/Forward",
                                                      valid_expert_request(path)))
    assert codec.decode(reply.output).shape == (3, load_config(path).hidden_size)
    request = router_pb2.GenerateRequest(prompt_ids=[5, 6, 7], sampling=router_pb2.SamplingParams(
        max_tokens=3, ignore_eos=True)).SerializeToString()
    chunks = [router_pb2.GenerateChunk.FromString(c) for c in call(router, "/moe.v1.RouterService/Generate",
                                                                   request, stream=True)]
    assert chunks[-1].finished and chunks[-1].completion_tokens == 3
