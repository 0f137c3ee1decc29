"""Replicas die and come back; requests keep succeeding where a replica is left, and fail fast (503) where none is.

The cluster: shard-0 with two replicas, shard-1 with one, a router and a gateway, all real processes.
The tests run in order on one cluster.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from moe_core.config import load_config
from moe_core.placement import even_split
from router_service.engine.engine import EngineConfig
from router_service.engine.params import SamplingParams
from router_service.local import build_local_engine
from tests.engine_helpers import drain
from tests.integration.services import Cluster

PROMPT = "Once upon a time, the router"


@pytest.fixture(scope="module")
def setup(demo_model, tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("failover"))
    specs = even_split(load_config(demo_model), 2)
    cluster.placement(specs)
    experts = {"shard-0": [cluster.expert(demo_model, specs[0], r) for r in range(2)],
               "shard-1": [cluster.expert(demo_model, specs[1], 0)]}
    cluster.wait(*experts["shard-0"], *experts["shard-1"])
    router = cluster.router(demo_model, experts, "--rpc-timeout-s", "5")
    cluster.wait(router)
    gateway = cluster.gateway(demo_model, [router], "--request-timeout-s", "20")
    cluster.wait(gateway)
    state = {"cluster": cluster, "specs": specs, "experts": experts, "router": router, "demo_model": demo_model,
             "url": f"http://127.0.0.1:{gateway.port}", "model": demo_model.resolve().name, "ports": {}}
    yield state
    cluster.stop()


def expected_text(demo_model, max_tokens: int) -> str:
    engine, tokenizer = build_local_engine(demo_model, "float32", "cpu", EngineConfig(kv_cache_bytes=16 << 20))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    (outs,) = drain(engine, {0: [(tokenizer.encode(PROMPT), params)]}).values()
    return "".join(o.text for o in outs)


def complete(state, max_tokens: int = 16) -> httpx.Response:
    body = {"model": state["model"], "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    return httpx.post(state["url"] + "/v1/completions", json=body, timeout=60)


def kill(state, shard: int, replica: int) -> None:
    """kill -9 a replica, remembering its port so it can come back at the same address."""
    service = state["experts"][f"shard-{shard}"][replica]
    state["ports"][shard, replica] = service.port
    service.process.kill()
    service.process.wait(10)


def restart(state, shard: int, replica: int) -> None:
    spec = state["specs"][shard]
    service = state["cluster"].expert(state["demo_model"], spec, replica, port=state["ports"][shard, replica])
    state["cluster"].wait(service)
    state["experts"][spec.shard_id][replica] = service


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll an observable condition (readiness), never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def live_replicas(state) -> dict[str, int]:
    import grpc

    from moe_core.pb import router_pb2, router_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{state['router'].port}") as channel:
        status = router_pb2_grpc.RouterServiceStub(channel).GetClusterStatus(router_pb2.ClusterStatusRequest())
    return {s.shard_id: sum(r.live for r in s.replicas) for s in status.shards}


def test_killing_a_replica_between_requests(setup, demo_model):
    expected = expected_text(demo_model, 16)
    assert complete(setup).json()["choices"][0]["text"] == expected
    kill(setup, 0, 0)
    reply = complete(setup)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected
    wait_until(lambda: live_replicas(setup) == {"shard-0": 1, "shard-1": 1}, what="the dead replica marked down")
    assert httpx.get(setup["url"] + "/readyz").status_code == 200


def test_killing_a_replica_during_a_request(setup, demo_model):
    restart(setup, 0, 0)
    wait_until(lambda: live_replicas(setup) == {"shard-0": 2, "shard-1": 1}, what="the restarted replica to rejoin")
    expected = expected_text(demo_model, 120)
    body = {"model": setup["model"], "prompt": PROMPT, "max_tokens": 120, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, killed = "", False
    with httpx.stream("POST", setup["url"] + "/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += "".join(c["text"] for c in event["choices"])
            if not killed and len(text) > 10:
                kill(setup, 0, 1)  # mid-stream
                killed = True
    assert killed and text == expected


def test_only_replica_dead_then_back(setup, demo_model):
    router_pid = setup["router"].process.pid
    kill(setup, 1, 0)
    started = time.monotonic()
    reply = complete(setup)
    assert reply.status_code == 503, reply.text
    assert time.monotonic() - started < 10 and "shard-1" in reply.json()["error"]["message"]
    wait_until(lambda: httpx.get(setup["url"] + "/readyz").status_code == 503, what="readiness to drop")
    restart(setup, 1, 0)
    wait_until(lambda: httpx.get(setup["url"] + "/readyz").status_code == 200, what="readiness to return")
    reply = complete(setup)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected_text(demo_model, 16)
    assert setup["router"].process.poll() is None and setup["router"].process.pid == router_pid
