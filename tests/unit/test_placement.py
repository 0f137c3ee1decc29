from __future__ import annotations

import json

import pytest
import torch

from moe_core.config import config_from_dict
from moe_core.errors import ConfigError
from moe_core.placement import (
    ShardSpec,
    even_split,
    ffn_range,
    ffn_split,
    load_placement,
    pairs_from_spec,
    parse_ffn,
    parse_ids,
    split_by_layers,
    uncovered,
    write_placement,
)
from router_service import shard_map as shard_map_module
from router_service.replica import Replica
from router_service.shard_map import Shard, ShardMap

CFG = config_from_dict({"model_type": "qwen2_moe", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                        "moe_intermediate_size": 4, "num_hidden_layers": 4, "num_attention_heads": 2,
                        "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 2})


def test_ids_and_pairs():
    assert parse_ids("0-2,5", 8, "x") == [0, 1, 2, 5]
    assert parse_ids("all", 3, "x") == [0, 1, 2]
    assert CFG.moe_layers == [1, 3]
    assert pairs_from_spec(CFG, "6-7") == [(1, 6), (1, 7), (3, 6), (3, 7)]
    assert pairs_from_spec(CFG, {"3": [0], "1": "1-2"}) == [(1, 1), (1, 2), (3, 0)]
    for bad, message in [("9", r"outside \[0, 8\)"), ("a-b", "cannot read expert ids"), ("", "no experts")]:
        with pytest.raises(ConfigError, match=message):
            parse_ids(bad, 8, "x")
    with pytest.raises(ConfigError, match="layer 0 is not an MoE layer"):
        pairs_from_spec(CFG, {"0": "1"})


def test_even_split_covers_everything_once():
    specs = even_split(CFG, 3)
    assert [len({e for _, e in s.pairs}) for s in specs] == [3, 2, 3]
    assert not uncovered(CFG, specs)
    with pytest.raises(ConfigError, match="cannot split 8 experts into 9"):
        even_split(CFG, 9)


def test_placement_file_roundtrip_and_errors(tmp_path):
    path = tmp_path / "placement.json"
    specs = [ShardSpec("a", [(1, 0), (3, 0)], ["h:1"]), ShardSpec("b", [(1, 1)], [])]
    write_placement(path, specs)
    loaded = load_placement(path, CFG)
    assert [(s.shard_id, s.pairs, s.replicas) for s in loaded] == [(s.shard_id, s.pairs, s.replicas) for s in specs]
    assert uncovered(CFG, loaded)[:2] == [(1, 2), (1, 3)]
    path.write_text(json.dumps({"shards": [{"id": "a", "experts": "0"}, {"id": "a", "experts": "1"}]}))
    with pytest.raises(ConfigError, match="shard ids must be unique"):
        load_placement(path, CFG)
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_placement(path, CFG)


def test_split_sends_each_pair_to_a_holder_once():
    a = Shard("a", [Replica("a", "127.0.0.1:1")], {(1, e) for e in range(5)} | {(3, e) for e in range(8)})
    b = Shard("b", [Replica("b", "127.0.0.1:2")], {(1, e) for e in range(4, 8)})  # expert 4 replicated
    shard_map = ShardMap(CFG, [a, b])
    ids = torch.tensor([[0, 4], [4, 7], [4, 5], [1, 2]])
    weights = torch.rand(4, 2)
    parts = shard_map.split(1, ids, weights)
    seen = torch.zeros(4, 2, dtype=torch.int64)
    for part in parts:
        held = {e for (layer, e) in part.shard.pairs if layer == 1}
        for row, pair_ids, pair_w in zip(part.rows.tolist(), part.ids.tolist(), part.weights.tolist(), strict=True):
            for j, (e, w) in enumerate(zip(pair_ids, pair_w, strict=True)):
                if e >= 0:
                    assert e in held and w == pytest.approx(weights[row, j].item())
                    seen[row, (ids[row] == e).nonzero()[0, 0]] += 1
    assert torch.equal(seen, torch.ones_like(seen))
    owners = {p.shard.shard_id for p in parts if (p.ids == 4).any()}
    assert owners == {"a", "b"}  # the replicated expert's rows are spread over both holders
    with pytest.raises(ConfigError, match="no shard holds experts"):
        ShardMap(CFG, [b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_small_step_splits_in_python_exactly_as_a_large_one_does(monkeypatch, dtype):
    a = Shard("a", [Replica("a", "127.0.0.1:1")], {(1, e) for e in range(5)} | {(3, e) for e in range(8)})
    b = Shard("b", [Replica("b", "127.0.0.1:2")], {(1, e) for e in range(3, 8)})  # experts 3 and 4 replicated
    shard_map = ShardMap(CFG, [a, b])
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=g).to(dtype)
    small = shard_map.split(1, ids, weights)
    monkeypatch.setattr(shard_map_module, "SMALL_PAIRS", 0)
    large = shard_map.split(1, ids, weights)
    assert [p.shard.shard_id for p in small] == [p.shard.shard_id for p in large] == ["a", "b"]
    for s, big in zip(small, large, strict=True):
        for name in ("rows", "ids", "weights"):
            got, want = getattr(s, name), getattr(big, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_split_by_layers_and_the_single_shard_fast_path():
    specs = split_by_layers(CFG, 2)
    assert [sorted({layer for layer, _ in s.pairs}) for s in specs] == [[1], [3]]
    assert not uncovered(CFG, specs)
    shards = [Shard(s.shard_id, [Replica(s.shard_id, "127.0.0.1:1")], set(s.pairs)) for s in specs]
    shard_map = ShardMap(CFG, shards)
    ids = torch.tensor([[0, 4], [7, 1]])
    (part,) = shard_map.split(3, ids, torch.rand(2, 2))
    assert part.shard.shard_id == "shard-1" and part.rows.tolist() == [0, 1] and part.ids.tolist() == ids.tolist()
    with pytest.raises(ConfigError, match="cannot split 2 MoE layers into 3"):
        split_by_layers(CFG, 3)


def test_rows_sent_counts_every_pair_across_batches():
    from router_service.grpc_experts import RowsSent

    sent = RowsSent(["a", "b"], layers=4, experts=8)
    g = torch.Generator().manual_seed(1)
    expected = {"a": torch.zeros(4, 8, dtype=torch.int64), "b": torch.zeros(4, 8, dtype=torch.int64)}
    for step in range(RowsSent.BATCH + 37):  # one batch counted on the way, the rest on reading
        shard, layer = "ab"[step % 2], (1, 3)[step % 3 == 0]
        ids = torch.randint(-1, 8, (3, 2), generator=g, dtype=torch.int32)
        sent.add(shard, layer, ids)
        for e in ids[ids >= 0].tolist():
            expected[shard][layer, e] += 1
    assert torch.equal(sent["a"], expected["a"]) and torch.equal(sent["b"], expected["b"])
    assert int(sent["a"].sum()) > 0


def test_ffn_slices_parse_split_and_roundtrip(tmp_path):
    assert parse_ffn("1/3", "x") == (1, 3)
    for bad, message in [("2/2", "0 <= PART < PARTS"), ("1", "cannot read"), ("a/2", "cannot read ffn slice")]:
        with pytest.raises(ConfigError, match=message):
            parse_ffn(bad, "x")
    assert [ffn_range(10, (p, 3)) for p in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 10)]
    specs = ffn_split(CFG, 2)
    assert [s.ffn for s in specs] == [(0, 2), (1, 2)] and all(len(s.pairs) == 16 for s in specs)
    assert not uncovered(CFG, specs)
    assert uncovered(CFG, [specs[0], ShardSpec("b", specs[1].pairs[1:], ffn=(1, 2))]) == [(1, 0)]
    path = tmp_path / "placement.json"
    write_placement(path, specs)
    assert [(s.shard_id, s.pairs, s.ffn) for s in load_placement(path, CFG)] == [(s.shard_id, s.pairs, s.ffn)
                                                                                 for s in specs]
    with pytest.raises(ConfigError, match="cannot split an FFN of 4 into 5"):
        ffn_split(CFG, 5)
    path.write_text(json.dumps({"shards": [{"id": "a", "experts": "all", "ffn": "0/2"},
                                           {"id": "b", "experts": "all", "ffn": "0/3"}]}))
    with pytest.raises(ConfigError, match="same number of ffn parts"):
        load_placement(path, CFG)
    path.write_text(json.dumps({"shards": [{"id": "a", "experts": "all", "ffn": "0/8"}]}))
    with pytest.raises(ConfigError, match="cannot cut an FFN of 4 into 8"):
        load_placement(path, CFG)


def test_ffn_parts_each_get_every_row_once():
    """Two FFN parts, the first split over two shards by experts: each row goes to one holder per part."""
    a = Shard("a", [Replica("a", "127.0.0.1:1")], {(layer, e) for layer in (1, 3) for e in range(4)}, ffn=(0, 2))
    b = Shard("b", [Replica("b", "127.0.0.1:2")], {(layer, e) for layer in (1, 3) for e in range(4, 8)}, ffn=(0, 2))
    c = Shard("c", [Replica("c", "127.0.0.1:3")], {(layer, e) for layer in (1, 3) for e in range(8)}, ffn=(1, 2))
    shard_map = ShardMap(CFG, [a, b, c])
    ids = torch.tensor([[0, 4], [5, 7], [1, 2]])
    weights = torch.rand(3, 2)
    parts = shard_map.split(1, ids, weights)
    assert [p.shard.shard_id for p in parts] == ["a", "b", "c"]
    whole = parts[-1]
    assert whole.rows.tolist() == [0, 1, 2] and torch.equal(whole.ids, ids.int()) and torch.equal(whole.weights,
                                                                                                  weights)
    seen = torch.zeros(3, 2, dtype=torch.int64)
    for part in parts[:2]:
        for row, pair_ids in zip(part.rows.tolist(), part.ids.tolist(), strict=True):
            seen[row] += torch.tensor([e >= 0 for e in pair_ids])
    assert torch.equal(seen, torch.ones_like(seen))
    with pytest.raises(ConfigError, match="different numbers of parts"):
        ShardMap(CFG, [a, b, Shard("d", [], c.pairs, ffn=(1, 3))])
    with pytest.raises(ConfigError, match=r"ffn part 1/2: no shard holds experts"):
        ShardMap(CFG, [a, b])
