from __future__ import annotations

import json

import pytest

from moe_core.config import (
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    config_from_dict,
    load_config,
)
from moe_core.errors import ConfigError

MIXTRAL = {"model_type": "mixtral", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2}


@pytest.mark.parametrize("name,family", [("mixtral-gqa2-top2", MixtralConfig),
                                         ("qwen2_moe-shared-dense0-top4", Qwen2MoeConfig),
                                         ("qwen3_moe-headdim32-norm-top2", Qwen3MoeConfig),
                                         ("olmoe-clip-norm-top4", OlmoeConfig)])
def test_transformers_configs_parse_into_their_family(tiny_checkpoint, name, family):
    cfg = load_config(tiny_checkpoint(name))
    assert type(cfg) is family
    assert cfg.vocab_size == 256 and cfg.hidden_size == 64


def test_family_specific_fields(tiny_checkpoint):
    qwen2 = load_config(tiny_checkpoint("qwen2_moe-shared-dense0-top4"))
    assert qwen2.moe_layers == [1] and qwen2.shared_expert_intermediate_size == 80 and qwen2.qkv_bias
    qwen3 = load_config(tiny_checkpoint("qwen3_moe-headdim32-norm-top2"))
    assert qwen3.head_dim == 32 and qwen3.qk_norm == "head" and qwen3.norm_topk_prob
    olmoe = load_config(tiny_checkpoint("olmoe-clip-norm-top4"))
    assert olmoe.clip_qkv == 0.8 and olmoe.qk_norm == "full"
    mixtral = load_config(tiny_checkpoint("mixtral-window-yarn-top4"))
    assert mixtral.sliding_window(0) == 7 and mixtral.rope.rope_type == "yarn" and mixtral.norm_topk_prob


def test_older_rope_fields_are_read():
    cfg = config_from_dict({**MIXTRAL, "rope_theta": 500000.0,
                            "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope.theta == 500000.0 and cfg.rope.rope_type == "linear" and cfg.rope.factor == 2.0


def test_missing_field_names_file_and_key(tmp_path):
    data = dict(MIXTRAL)
    del data["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config\.json: missing required field 'hidden_size'"):
        load_config(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported; supported: mixtral, olmoe"),
    ({"hidden_size": "big"}, "field 'hidden_size' must be int"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok must be between 1"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope"}}, "rope type 'longrope' is not supported"),
    ({"num_local_experts": None}, "missing required field 'num_local_experts'"),
])
def test_bad_values_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**MIXTRAL, **change}, "x/config.json")


def test_missing_model_type_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="missing required field 'model_type'"):
        config_from_dict({k: v for k, v in MIXTRAL.items() if k != "model_type"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nowhere")


def test_generation_config_eos_ids_are_merged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**MIXTRAL, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_config(tmp_path).eos_token_ids == (2, 7)
