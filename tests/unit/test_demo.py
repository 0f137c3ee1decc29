"""The built-in demo model: reproducible, loadable by transformers and our config reader, word-like output."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_core import demo
from moe_core.config import MixtralConfig, load_config
from moe_core.errors import CheckpointError
from moe_core.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    demo.build_demo_model(path)
    return path


@pytest.fixture(scope="module")
def hf_model(demo_path: Path) -> object:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        demo_path, dtype=torch.float32, output_loading_info=True
    )
    model.loading_info = info
    return model.eval()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_builds_are_byte_identical(demo_path: Path, tmp_path: Path) -> None:
    demo.build_demo_model(tmp_path / "again")
    first, second = _files(demo_path), _files(tmp_path / "again")
    assert sorted(first) == sorted(demo.FILES)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds"


def test_checkpoint_layout(demo_path: Path) -> None:
    index = json.loads((demo_path / demo.INDEX).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(demo.SHARDS)
    tensors = {}
    for shard in demo.SHARDS:
        with safe_open(demo_path / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    assert tensors.keys() == weight_map.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    config = json.loads((demo_path / "config.json").read_text())
    vocab, h, f = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    expected = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h),
                "model.norm.weight": (h,)}
    for layer in range(config["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        expected |= {pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv, h),
                     pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, q),
                     pre + "block_sparse_moe.gate.weight": (config["num_local_experts"], h),
                     pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,)}
        for e in range(config["num_local_experts"]):
            expert = f"{pre}block_sparse_moe.experts.{e}."
            expected |= {expert + "w1.weight": (f, h), expert + "w3.weight": (f, h),
                         expert + "w2.weight": (h, f)}
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert all(t.abs().sum() > 0 for t in tensors.values())  # every weight real, none zeroed out


def test_transformers_loads_model_and_tokenizer(demo_path: Path, hf_model: object) -> None:
    info = hf_model.loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_path)
    assert len(tokenizer) == hf_model.config.vocab_size == demo.SIZES["vocab"]
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(demo.SPECIAL_TOKENS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (demo.BOS, demo.EOS)
    assert tokenizer.model_max_length == 2048


def test_config_parses_as_mixtral(demo_path: Path) -> None:
    config = load_config(demo_path)
    assert isinstance(config, MixtralConfig)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (2048, 256, 4)
    assert (config.num_experts, config.num_experts_per_tok, config.head_dim) == (8, 2, 32)
    assert (config.bos_token_id, config.eos_token_ids, config.tie_word_embeddings) == (1, (2,), False)
    assert config.rope.theta == 10000.0


def test_greedy_continuation_reads_like_the_corpus(demo_path: Path, hf_model: object) -> None:
    tokenizer = Tokenizer.from_dir(demo_path)
    prompt = tokenizer.encode("The river")
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, len(prompt):].tolist())
    corpus_words = set(re.findall(r"[a-z]+", demo.CORPUS.read_text().lower()))
    words = re.findall(r"[a-z]+", text.lower())
    assert sum(w in corpus_words for w in words) >= 3, text


def test_ensure_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "cache"))
    path = demo.ensure_demo_model()
    assert path == demo.demo_dir() == tmp_path / "cache" / f"demo-v{demo.DEMO_VERSION}"
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_rebuild(target: Path) -> None:
        raise AssertionError("rebuilt an existing demo model")

    monkeypatch.setattr(demo, "build_demo_model", no_rebuild)
    assert demo.ensure_demo_model() == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folders left behind


def test_ensure_survives_a_race(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(demo.ensure_demo_model, [target, target]))
    assert results == [target, target]
    assert sorted(p.name for p in target.iterdir()) == sorted(demo.FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_ensure_refuses_a_broken_folder(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="remove it"):
        demo.ensure_demo_model(tmp_path / "demo")
