"""Benchmark model presets (DESIGN §8), written as real Hugging Face checkpoints with random weights."""

from __future__ import annotations

import json
from pathlib import Path

from moe_core.demo import write_padded_tokenizer

PRESETS = {
    # Mixtral shape: hidden 512, 8 layers, 8 experts, top-2, ffn 1408, 8 heads / 2 KV heads, vocab 32000.
    "bench-s": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                    max_position_embeddings=4096),
    "bench-m": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                    max_position_embeddings=4096),
}
# bench-m's checkpoint is written in bfloat16, as published MoE checkpoints are: half the bytes to make, write
# and load (4.5 B parameters, 9 GB) on the GPU machines it is for. The others stay float32.
FILE_DTYPES = {"bench-m": "bfloat16"}
# bench-s with skewed routing, as trained models route: each layer's gate rows scaled by e^(strength * t),
# t from -0.5 to 0.5 over the experts in a per-layer random order, so some experts win the top-k far more
# often than others (at strength 2 the busiest expert of a layer gets 1.6-2.5x the mean rows of random prompts).
SKEWED = {"bench-s-skewed": ("bench-s", 2.0)}
PRESETS |= {name: PRESETS[base] for name, (base, _) in SKEWED.items()}


def make_bench_model(preset: str, target: Path, seed: int = 0) -> Path:
    """Write the preset once (a marker file records the preset and seed); reuse it afterwards."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    marker = target / "bench-preset.json"
    wanted = {"preset": preset, "seed": seed, **PRESETS[preset]}
    if preset in FILE_DTYPES:
        wanted["file_dtype"] = FILE_DTYPES[preset]
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        if not (target / "tokenizer.json").exists():
            write_padded_tokenizer(target, PRESETS[preset]["vocab_size"])
        return target
    config = AutoConfig.for_model("mixtral", bos_token_id=1, eos_token_id=2, **PRESETS[preset])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, FILE_DTYPES.get(preset, "float32")))
    if preset in SKEWED:
        skew_gates(model, SKEWED[preset][1], seed)
    model.save_pretrained(target, max_shard_size="200MB")
    write_padded_tokenizer(target, PRESETS[preset]["vocab_size"])
    marker.write_text(json.dumps(wanted))
    return target


def skew_gates(model, strength: float, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        moe = getattr(layer, "block_sparse_moe", None) or layer.mlp
        experts = moe.gate.weight.shape[0]
        scale = torch.exp(strength * torch.linspace(-0.5, 0.5, experts))[torch.randperm(experts, generator=g)]
        with torch.no_grad():
            moe.gate.weight.mul_(scale[:, None])
