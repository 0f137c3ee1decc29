"""Tiny random checkpoints made by `transformers` itself, in each supported family's real layout.

Weights are drawn with a larger spread than the library's init so that logits are well separated
and greedy decoding is not decided by float noise between two implementations.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, max_position_embeddings=512,
            initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

# name -> (model_type, config overrides). Shapes cover GQA ratios, head dims, expert counts,
# top-k 1/2/4, dense layers, shared experts, qk norms, clip_qkv, sliding windows and rope scaling.
SHAPES: dict[str, tuple[str, dict]] = {
    "mixtral-gqa2-top2": ("mixtral", dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2, intermediate_size=96)),
    "mixtral-mqa-top1-headdim32": ("mixtral", dict(num_attention_heads=8, num_key_value_heads=1, head_dim=32,
                                                   num_local_experts=8, num_experts_per_tok=1,
                                                   intermediate_size=64)),
    "mixtral-window-yarn-top4": ("mixtral", dict(num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
                                                 num_experts_per_tok=4, intermediate_size=48, sliding_window=7,
                                                 head_dim=16,  # transformers' yarn needs it explicit
                                                 rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                                      factor=8.0,
                                                                      original_max_position_embeddings=64))),
    "qwen2_moe-shared-dense0-top4": ("qwen2_moe", dict(num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                                       num_experts_per_tok=4, moe_intermediate_size=32,
                                                       intermediate_size=96, shared_expert_intermediate_size=80,
                                                       decoder_sparse_step=2)),
    "qwen2_moe-mlponly-norm-top1-llama3": ("qwen2_moe", dict(
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=1,
        moe_intermediate_size=48, intermediate_size=64, shared_expert_intermediate_size=32, mlp_only_layers=[1],
        norm_topk_prob=True, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=64))),
    "qwen3_moe-headdim32-norm-top2": ("qwen3_moe", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                        num_experts=4, num_experts_per_tok=2,
                                                        moe_intermediate_size=48, intermediate_size=96,
                                                        norm_topk_prob=True)),
    "qwen3_moe-mlponly-mqa-top4-linear": ("qwen3_moe", dict(
        num_attention_heads=4, num_key_value_heads=1, num_experts=8, num_experts_per_tok=4,
        moe_intermediate_size=32, intermediate_size=64, mlp_only_layers=[0],
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "olmoe-gqa2-top2": ("olmoe", dict(num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, intermediate_size=64)),
    "olmoe-clip-norm-top4": ("olmoe", dict(num_attention_heads=8, num_key_value_heads=8, num_experts=8,
                                           num_experts_per_tok=4, intermediate_size=32, clip_qkv=0.8,
                                           norm_topk_prob=True)),
}

FAMILY_DEFAULT = {"mixtral": "mixtral-gqa2-top2", "qwen2_moe": "qwen2_moe-shared-dense0-top4",
                  "qwen3_moe": "qwen3_moe-headdim32-norm-top2", "olmoe": "olmoe-gqa2-top2"}


def make_checkpoint(name: str, target: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Write the named tiny model with `save_pretrained`; optionally sharded into several files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = SHAPES[name]
    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(target, **kwargs)
    return target
