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


def make_bench_model(preset: str, target: Path, seed: int = 0) -> Path:
    """Write the preset once (a marker file records the preset and seed); reuse it afterwards."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    marker = target / "bench-preset.json"
    wanted = {"preset": preset, "seed": seed, **PRESETS[preset]}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        if not (target / "tokenizer.json").exists():
            write_padded_tokenizer(target, PRESETS[preset]["vocab_size"])
        return target
    config = AutoConfig.for_model("mixtral", bos_token_id=1, eos_token_id=2, **PRESETS[preset])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target, max_shard_size="200MB")
    write_padded_tokenizer(target, PRESETS[preset]["vocab_size"])
    marker.write_text(json.dumps(wanted))
    return target
