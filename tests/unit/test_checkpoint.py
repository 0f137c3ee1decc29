from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_core.checkpoint import INDEX_FILE, Checkpoint
from moe_core.config import load_config
from moe_core.errors import CheckpointError
from moe_core.loader import load_dense_model, load_expert_shard
from moe_core.weights import load_experts
from tests.tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = make_checkpoint("mixtral-mqa-top1-headdim32", tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")
    assert (path / INDEX_FILE).exists() and len(list(path.glob("*.safetensors"))) > 3
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_subset_reads_only_its_tensors(sharded):
    ckpt = Checkpoint(sharded)
    cfg = load_config(sharded)
    pairs = [(0, 1), (2, 5), (2, 6)]
    experts = load_experts(ckpt, cfg, pairs, torch.float32)
    expected_keys = sorted(cfg.names.expert(layer, e, w) for layer, e in pairs for w in range(3))
    assert sorted(ckpt.touched) == expected_keys
    assert ckpt.bytes_read == sum(ckpt.nbytes(k) for k in expected_keys)
    assert sorted(experts) == [0, 2] and experts[2].expert_ids == [5, 6]
    assert experts[2].local_of.tolist() == [-1, -1, -1, -1, -1, 0, 1, -1]
    full = load_experts(Checkpoint(sharded), cfg, None, torch.float32)
    assert torch.equal(experts[2].down[1].dense(), full[2].down[6].dense())
    assert torch.equal(experts[0].gate_up[0].dense(), full[0].gate_up[1].dense())


def test_dense_load_touches_no_expert(sharded):
    ckpt = Checkpoint(sharded)
    load_dense_model(sharded, ckpt=ckpt)
    assert ckpt.touched and not [k for k in ckpt.touched if ".experts." in k]


def test_dtype_choice(sharded):
    _, experts = load_expert_shard(sharded, [(1, 0)], dtype=torch.bfloat16)
    assert experts[1].gate_up[0].dtype == torch.bfloat16
    assert load_dense_model(sharded, torch.float16).weights.embed.dtype == torch.float16


def test_fused_expert_layout_loads_the_same(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("olmoe-gqa2-top2")
    cfg = load_config(src)
    tensors = load_file(src / "model.safetensors")
    for layer in range(cfg.num_hidden_layers):
        gate_up = [torch.cat([tensors.pop(cfg.names.expert(layer, e, 0)), tensors.pop(cfg.names.expert(layer, e, 1))])
                   for e in range(cfg.num_experts)]
        down = [tensors.pop(cfg.names.expert(layer, e, 2)) for e in range(cfg.num_experts)]
        tensors[cfg.names.fused_experts(layer, "gate_up_proj")] = torch.stack(gate_up)
        tensors[cfg.names.fused_experts(layer, "down_proj")] = torch.stack(down)
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    save_file(tensors, dst / "model.safetensors")
    _, fused = load_expert_shard(dst, [(1, 3)])
    _, legacy = load_expert_shard(src, [(1, 3)])
    assert torch.equal(fused[1].gate_up[0].dense(), legacy[1].gate_up[0].dense())
    assert torch.equal(fused[1].down[0].dense(), legacy[1].down[0].dense())
    # An FFN part reads only its rows and columns, the same from either layout.
    size = cfg.moe_intermediate_size
    whole_gate_up, whole_down = legacy[1].gate_up[0].dense(), legacy[1].down[0].dense()
    for part in range(2):
        rows = slice(size * part // 2, size * (part + 1) // 2)
        want_gate_up = torch.cat([whole_gate_up[:size][rows], whole_gate_up[size:][rows]])
        for path in (src, dst):
            ckpt = Checkpoint(path)
            (half,) = load_experts(ckpt, cfg, [(1, 3)], torch.float32, ffn=(part, 2)).values()
            assert torch.equal(half.gate_up[0].dense(), want_gate_up), (path.name, part)
            assert torch.equal(half.down[0].dense(), whole_down[:, rows]), (path.name, part)
            assert ckpt.bytes_read == 3 * (rows.stop - rows.start) * cfg.hidden_size * 4


def test_missing_tensor_names_the_key(tmp_path, tiny_checkpoint):
    dst = _copy(tiny_checkpoint("mixtral-gqa2-top2"), tmp_path / "m")
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' not found"):
        load_dense_model(dst)


def test_wrong_shape_names_the_key(tmp_path, tiny_checkpoint):
    dst = _copy(tiny_checkpoint("mixtral-gqa2-top2"), tmp_path / "m")
    tensors = load_file(dst / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[3\], config\.json implies \[64\]"):
        load_dense_model(dst)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_names_the_file(tmp_path, tiny_checkpoint, damage):
    dst = _copy(tiny_checkpoint("mixtral-gqa2-top2"), tmp_path / "m")
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x07not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_dense_model(dst)


def test_index_naming_a_missing_file(tmp_path, sharded):
    dst = _copy(sharded, tmp_path / "m")
    victim = sorted(dst.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which does not exist"):
        Checkpoint(dst)
    (dst / INDEX_FILE).write_text(json.dumps({"nope": 1}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Checkpoint(dst)


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        Checkpoint(tmp_path)


def test_unknown_expert_pair_is_refused(sharded):
    with pytest.raises(CheckpointError, match=r"no expert \(0, 99\)"):
        load_expert_shard(sharded, [(0, 99)])
