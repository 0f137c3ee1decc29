"""A 2-shard x 2-replica cluster computes what one process computes, and each shard gets exactly its rows;
so does a cluster whose shards each compute half of every expert's FFN, and one placed by `moe-serve plan`
with a hot expert copied to both shards. In bfloat16, a cluster tracks one process to bfloat16's precision."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from moe_core.balance import plan_placement
from moe_core.config import load_config
from moe_core.forward import sequence_logits
from moe_core.loader import load_dense_model, load_expert_shard
from moe_core.placement import even_split, ffn_split
from moe_core.revision import model_revision
from router_service.discovery import discover
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.expert_backend import LocalExperts
from router_service.grpc_experts import GrpcExperts
from tests.engine_helpers import CountingExperts, LoopThread, drain, logprobs, random_prompts, tokens
from tests.tiny_models import FAMILY_DEFAULT

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)


def schedule(prompts):
    """16 requests joining at different steps."""
    joins: dict[int, list] = {}
    for i, prompt in enumerate(prompts):
        joins.setdefault(i % 5 * 2, []).append((prompt, PARAMS))
    return joins


def same_as_one_process(path, cfg, remote: GrpcExperts, family: str) -> CountingExperts:
    """16 requests through the cluster's experts and through one process's: the same tokens and logprobs."""
    model = load_dense_model(path)
    counting = CountingExperts(remote, cfg.num_hidden_layers, cfg.num_experts)
    config = EngineConfig(kv_cache_bytes=8 << 20, block_size=8, overlap=True)  # the cluster runs micro-batches
    prompts = random_prompts(16, cfg.vocab_size, seed=7)
    clustered = list(drain(Engine(model, counting, None, config), schedule(prompts)).values())
    local = LocalExperts(load_expert_shard(path, None)[1])
    alone = list(drain(Engine(model, local, None, config), schedule(prompts)).values())
    for i, (c, a) in enumerate(zip(clustered, alone, strict=True)):
        assert tokens(c) == tokens(a), f"{family}: request {i} differs between cluster and one process"
        diff = max(abs(x - y) for x, y in zip(logprobs(c), logprobs(a), strict=True))
        assert diff <= 1e-4, f"{family}: request {i} logprobs differ by {diff}"
    return counting


# Every family over the data plane (the default hot path), one over gRPC streams alone.
@pytest.mark.parametrize("family,data_plane", [(f, True) for f in FAMILY_DEFAULT] + [("mixtral", False)])
def test_cluster_equals_one_process(tiny_checkpoint, cluster, family, data_plane):
    path = tiny_checkpoint(FAMILY_DEFAULT[family])
    cfg = load_config(path)
    specs = even_split(cfg, 2)
    cluster.placement(specs)
    replicas = {s.shard_id: [cluster.expert(path, s, r) for r in range(2)] for s in specs}
    cluster.wait(*[r for rs in replicas.values() for r in rs])

    loop = LoopThread()
    try:
        addresses = {sid: [f"127.0.0.1:{r.port}" for r in rs] for sid, rs in replicas.items()}
        shard_map, _ = loop.run(discover(cfg, addresses, model_revision(path), 60))
        remote = GrpcExperts(cfg, shard_map, model_revision(path), loop.loop, data_plane=data_plane)
        counting = same_as_one_process(path, cfg, remote, family)

        # Every shard received exactly the rows of the experts it holds, as the gates decided.
        infos = {sid: [loop.run(r.describe(5)) for r in shard.replicas]
                 for sid, shard in ((s.shard_id, s) for s in shard_map.shards)}
        received = torch.zeros_like(counting.decisions)
        for spec in specs:
            on_shard = torch.zeros_like(received)
            for info in infos[spec.shard_id]:
                for pair in info.experts:
                    on_shard[pair.layer, pair.expert] += pair.rows
            assert torch.equal(on_shard, remote.stats.rows_sent[spec.shard_id])
            held = torch.zeros_like(on_shard, dtype=torch.bool)
            for layer, expert in spec.pairs:
                held[layer, expert] = True
            assert not on_shard[~held].any(), f"{spec.shard_id} got rows of experts it does not hold"
            received += on_shard
        assert torch.equal(received, counting.decisions)
        assert int(counting.decisions.sum()) > 0
        # The path the rows took: every replica's data link carried steps, or none was ever made.
        links = [r.link for s in shard_map.shards for r in s.replicas]
        if data_plane:
            assert all(link is not None and not link.broken for link in links), links
        else:
            assert links == [None] * len(links)
        assert remote.stats.retries == 0
        loop.run(remote.aclose())
    finally:
        loop.stop()


@contextmanager
def one_replica_each(cluster, path, cfg, specs, extra: list[str] | None = None):
    """Each shard of `specs` as one expert service; yields (loop, the router's expert backend over them)."""
    cluster.placement(specs)
    experts = {s.shard_id: cluster.expert(path, s, 0, extra=extra) for s in specs}
    cluster.wait(*experts.values())
    loop = LoopThread()
    try:
        addresses = {sid: [f"127.0.0.1:{e.port}"] for sid, e in experts.items()}
        shard_map, _ = loop.run(discover(cfg, addresses, model_revision(path), 60))
        remote = GrpcExperts(cfg, shard_map, model_revision(path), loop.loop)
        yield loop, remote
        loop.run(remote.aclose())
    finally:
        loop.stop()


def test_a_bfloat16_cluster_tracks_one_process(tiny_checkpoint, cluster):
    """bfloat16 end to end: expert services in bfloat16 (on the pair-dot GEMM where the CPU has AVX512-BF16),
    rows on the wire in bfloat16. Each shard's weighted sum is rounded to bfloat16 before the router adds
    them, once more than in one process, so the logits agree to bfloat16's precision, not bit for bit."""
    path = tiny_checkpoint(FAMILY_DEFAULT["mixtral"])
    cfg = load_config(path)
    model = load_dense_model(path, torch.bfloat16)
    prompt = random_prompts(1, cfg.vocab_size, seed=3)[0]
    alone = sequence_logits(model, LocalExperts(load_expert_shard(path, None, torch.bfloat16)[1]), prompt).float()
    reference = sequence_logits(load_dense_model(path), LocalExperts(load_expert_shard(path, None)[1]), prompt)
    specs = even_split(cfg, 2)
    with one_replica_each(cluster, path, cfg, specs, extra=["--dtype", "bfloat16"]) as (_, remote):
        clustered = sequence_logits(model, remote, prompt).float()
        assert all(int(remote.stats.rows_sent[s.shard_id].sum()) > 0 for s in specs)  # both shards computed
    scale = float(reference.abs().max())
    assert (clustered - alone).abs().max() <= 0.05 * scale
    assert (clustered.argmax(-1) == alone.argmax(-1)).float().mean() >= 0.9
    # and both are bfloat16 renderings of the float32 model, not something else near each other
    off = (clustered - reference).abs().mean()
    assert 0 < off <= 0.02 * scale and (clustered.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.7


def computed(loop, shard, like: torch.Tensor):
    """(Describe of the shard's one replica, the rows it computed per (layer, expert))."""
    (info,) = [loop.run(r.describe(5)) for r in shard.replicas]
    on_shard = torch.zeros_like(like)
    for pair in info.experts:
        on_shard[pair.layer, pair.expert] += pair.rows
    return info, on_shard


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_ffn_parts_equal_one_process(tiny_checkpoint, cluster, family):
    """Two shards, each half of every expert's FFN: every row goes to both, and their sums make the output."""
    path = tiny_checkpoint(FAMILY_DEFAULT[family])
    cfg = load_config(path)
    with one_replica_each(cluster, path, cfg, ffn_split(cfg, 2)) as (loop, remote):
        assert [s.ffn for s in remote.map.shards] == [(0, 2), (1, 2)]
        counting = same_as_one_process(path, cfg, remote, family)
        assert int(counting.decisions.sum()) > 0
        for shard in remote.map.shards:  # each shard computed its half of every pair the gates chose
            info, on_shard = computed(loop, shard, counting.decisions)
            assert (info.ffn_part, info.ffn_parts) == shard.ffn
            assert torch.equal(on_shard, counting.decisions), shard.shard_id


def test_planned_placement_with_a_copied_expert_equals_one_process(tiny_checkpoint, cluster):
    """A plan for a load where expert 0 takes two thirds of every layer's rows, more than one shard's fair share:
    it sits on both shards, each gets part of its rows, and the answers are those of one process."""
    path = tiny_checkpoint(FAMILY_DEFAULT["mixtral"])
    cfg = load_config(path)
    per_step = torch.full((cfg.num_hidden_layers, cfg.num_experts), 100.0)  # rows per layer step
    per_step[:, 0] = 200.0 * (cfg.num_experts - 1)
    specs, _ = plan_placement(cfg, per_step, 2)
    assert all((layer, 0) in s.pairs for s in specs for layer in cfg.moe_layers)
    with one_replica_each(cluster, path, cfg, specs) as (loop, remote):
        counting = same_as_one_process(path, cfg, remote, "mixtral")
        received = torch.zeros_like(counting.decisions)
        for shard in remote.map.shards:
            _, on_shard = computed(loop, shard, counting.decisions)
            assert all(on_shard[layer, 0] > 0 for layer in cfg.moe_layers), f"{shard.shard_id} got no copied rows"
            received += on_shard
        assert torch.equal(received, counting.decisions)  # every pair computed once, by one of its holders
