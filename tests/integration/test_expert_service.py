"""An expert service answers bad messages with clear statuses and keeps serving."""

from __future__ import annotations

import re

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_core import codec
from moe_core.config import load_config
from moe_core.experts import expert_forward
from moe_core.loader import load_expert_shard
from moe_core.pb import expert_pb2, router_pb2, router_pb2_grpc
from moe_core.revision import model_revision
from tests.integration.conftest import SHARD_MODEL

NAME = SHARD_MODEL


def request(path, layer=1, rows=5, ids=None, revision=None, **override):
    cfg = load_config(path)
    x = torch.randn(rows, cfg.hidden_size, generator=torch.Generator().manual_seed(rows))
    ids = torch.tensor([[0, 1]] * rows, dtype=torch.int32) if ids is None else ids
    message = expert_pb2.ExpertRequest(model_revision=revision or model_revision(path), layer=layer,
                                       hidden=codec.encode(x), expert_ids=codec.encode(ids),
                                       expert_weights=codec.encode(torch.full(ids.shape, 0.5)), step_id=7)
    for field, value in override.items():
        getattr(message, field).CopyFrom(value)
    return message, x


def test_forward_computes_the_weighted_sum(shard):
    path, stub, channel = shard
    message, x = request(path, ids=torch.tensor([[0, 1], [1, -1], [-1, -1]], dtype=torch.int32), rows=3)
    reply = stub.Forward(message)
    _, local = load_expert_shard(path, [(1, 0), (1, 1)])
    expected = expert_forward(local[1], x, torch.tensor([[0, 1], [1, -1], [-1, -1]]), torch.full((3, 2), 0.5))
    assert reply.step_id == 7 and torch.allclose(codec.decode(reply.output), expected, atol=1e-6)
    info = stub.Describe(expert_pb2.DescribeRequest())
    assert info.model_revision == model_revision(path) and info.shard_id == "shard-0"
    assert {(p.layer, p.expert, p.rows) for p in info.experts} == {(1, 0, 1), (1, 1, 2), (2, 1, 0)}
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="moe.v1.ExpertService"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("change,code,text", [
    (dict(revision="0000"), grpc.StatusCode.FAILED_PRECONDITION, "model revision mismatch"),
    (dict(layer=0), grpc.StatusCode.INVALID_ARGUMENT, "holds no experts of layer 0"),
    (dict(ids=torch.tensor([[0, 3]] * 5, dtype=torch.int32)), grpc.StatusCode.INVALID_ARGUMENT, r"experts \[3\]"),
    (dict(ids=torch.tensor([[0, 99]] * 5, dtype=torch.int32)), grpc.StatusCode.INVALID_ARGUMENT, "must be -1 or in"),
    (dict(hidden=codec.encode(torch.zeros(5, 7))), grpc.StatusCode.INVALID_ARGUMENT, "width 7"),
    (dict(hidden=codec.encode(torch.zeros(4, 64))), grpc.StatusCode.INVALID_ARGUMENT, "shapes disagree"),
    (dict(expert_ids=codec.encode(torch.zeros(5, 2))), grpc.StatusCode.INVALID_ARGUMENT, "expected int32"),
    (dict(expert_weights=expert_pb2.ExpertRequest().hidden), grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype"),
])
def test_bad_requests_get_clear_statuses(shard, change, code, text):
    path, stub, _ = shard
    overrides = {k: v for k, v in change.items() if k in ("hidden", "expert_ids", "expert_weights")}
    plain = {k: v for k, v in change.items() if k not in overrides}
    message, _ = request(path, **plain, **overrides)
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(message)
    assert info.value.code() == code
    assert re.search(text, info.value.details()), info.value.details()
    assert stub.Forward(request(path)[0]).output.data  # still serving


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05abc", bytes(range(256))])
def test_garbage_bytes_are_invalid_argument(shard, payload):
    path, stub, channel = shard
    raw = channel.unary_unary("/moe.v1.ExpertService/Forward")
    with pytest.raises(grpc.RpcError) as info:
        raw(payload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Forward(request(path)[0]).output.data


def test_a_bad_stream_message_is_answered_and_the_stream_lives_on(shard):
    path, stub, _ = shard
    good, _ = request(path)
    bad, _ = request(path, layer=0)
    replies = list(stub.ForwardStream(iter([good, bad, good])))
    assert [r.HasField("error") for r in replies] == [False, True, False]
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "layer 0" in replies[1].error.message


def test_router_refuses_garbage_and_keeps_serving(tiny_checkpoint, cluster):
    path = tiny_checkpoint(NAME)
    router = cluster.router(path, None)
    cluster.wait(router)
    channel = grpc.insecure_channel(f"127.0.0.1:{router.port}")
    raw = channel.unary_stream("/moe.v1.RouterService/Generate")
    with pytest.raises(grpc.RpcError) as info:
        list(raw(b"\xff\xfe garbage"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub = router_pb2_grpc.RouterServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(router_pb2.GenerateRequest(prompt_ids=[1, 2], sampling=router_pb2.SamplingParams(
            max_tokens=2, top_p=7.0))))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in info.value.details()
    chunks = list(stub.Generate(router_pb2.GenerateRequest(prompt_ids=[1, 2], sampling=router_pb2.SamplingParams(
        max_tokens=3, ignore_eos=True))))
    assert chunks[-1].finished and chunks[-1].completion_tokens == 3
    channel.close()
