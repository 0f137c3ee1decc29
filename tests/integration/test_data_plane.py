"""An expert service's data plane answers exactly what its gRPC Forward answers, and survives bad input."""

from __future__ import annotations

import socket

import grpc
import pytest
import torch

from moe_core import frames
from moe_core.config import load_config
from moe_core.pb import expert_pb2
from moe_core.placement import even_split
from moe_core.revision import model_revision
from router_service.data_link import DataLink
from router_service.discovery import discover
from router_service.grpc_experts import GrpcExperts
from tests.engine_helpers import LoopThread
from tests.integration.test_expert_service import NAME, request


@pytest.fixture
def served(shard):
    path, stub, _ = shard
    return path, stub, stub.Describe(expert_pb2.DescribeRequest()).data_port


def test_the_data_plane_answers_what_grpc_answers(served):
    path, stub, port = served
    assert port > 0, "Describe must advertise the data plane"
    link = DataLink("127.0.0.1", port, timeout_s=30)
    for step, rows in enumerate((1, 5, 64)):
        message, _ = request(path, rows=rows)
        message.step_id = step
        link.send(message)
        by_link = link.receive(step)
        by_grpc = stub.Forward(message)
        assert by_link.step_id == step and not by_link.HasField("error")
        assert by_link.output == by_grpc.output  # the same bytes
    link.close()


def test_a_refused_message_gets_its_status_and_the_link_stays_open(served):
    path, stub, port = served
    link = DataLink("127.0.0.1", port, timeout_s=30)
    bad, _ = request(path, revision="0000")
    bad.step_id = 11
    link.send(bad)
    refused = link.receive(11)
    assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "model revision mismatch" in refused.error.message
    good, _ = request(path)
    good.step_id = 12
    link.send(good)
    assert link.receive(12).output == stub.Forward(good).output
    link.close()


def test_garbage_gets_an_error_or_a_closed_connection_and_the_service_keeps_serving(served):
    path, stub, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(frames.pack(b"\xff\xff\xff not a protobuf"))
        answer = expert_pb2.ExpertResponse.FromString(frames.read_frame(sock))
        assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        sock.sendall(frames.HEADER.pack(2**32 - 1))  # a length past the limit: the framing is lost
        with pytest.raises(frames.FrameError, match="closed"):
            frames.read_frame(sock)
    link = DataLink("127.0.0.1", port, timeout_s=30)
    message, _ = request(path)
    link.send(message)
    assert link.receive(message.step_id).output == stub.Forward(message).output
    link.close()


def test_a_router_that_cannot_reach_the_data_plane_uses_grpc_and_keeps_the_replica(tiny_checkpoint, cluster):
    path = tiny_checkpoint(NAME)
    cfg = load_config(path)
    specs = even_split(cfg, 1)
    cluster.placement(specs)
    service = cluster.expert(path, specs[0], 0)
    cluster.wait(service)
    loop = LoopThread()
    try:
        shard_map, _ = loop.run(discover(cfg, {specs[0].shard_id: [f"127.0.0.1:{service.port}"]},
                                         model_revision(path), 60))
        (replica,) = shard_map.shards[0].replicas
        assert replica.data_port > 0
        experts = GrpcExperts(cfg, shard_map, model_revision(path), loop.loop)
        x = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
        ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2], [1, 3]])
        weights = torch.rand(6, 2, generator=torch.Generator().manual_seed(4))
        direct = experts.forward(1, x, weights, ids)
        assert replica.link is not None and not replica.link.broken  # that step took the data plane
        with socket.socket() as closed:  # bound, never listening: what a port behind NAT looks like
            closed.bind(("127.0.0.1", 0))
            replica.data_port = closed.getsockname()[1]
            fallen_back = experts.forward(1, x, weights, ids)
        assert torch.equal(fallen_back, direct)
        assert replica.live and replica.data_port == 0 and experts.stats.retries == 0
        assert torch.equal(experts.forward(1, x, weights, ids), direct)  # and from then on over gRPC
        loop.run(experts.aclose())
    finally:
        loop.stop()
