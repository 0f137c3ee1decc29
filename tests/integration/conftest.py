from __future__ import annotations

import grpc
import pytest

from moe_core.pb import expert_pb2_grpc
from moe_core.placement import ShardSpec
from tests.integration.services import Cluster

SHARD_MODEL = "mixtral-gqa2-top2"  # the model of the `shard` fixture


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def shard(tiny_checkpoint, cluster):
    """One expert service holding (1, 0), (1, 1), (2, 1): (model path, its gRPC stub, the channel)."""
    path = tiny_checkpoint(SHARD_MODEL)
    spec = ShardSpec("shard-0", [(1, 0), (1, 1), (2, 1)])
    cluster.placement([spec])
    service = cluster.expert(path, spec, 0)
    cluster.wait(service)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    yield path, expert_pb2_grpc.ExpertServiceStub(channel), channel
    channel.close()
