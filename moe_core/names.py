"""Checkpoint key names: the map from the model's logical weights to Hugging Face tensor names.

The model math takes weights under the names the checkpoint uses, so loading is this name map and
nothing else; an expert service builds the names of its own (layer, expert) tensors from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointNames:
    moe_block: str  # "block_sparse_moe" (Mixtral) or "mlp" (Qwen-MoE, OLMoE)
    experts: tuple[str, str, str]  # the gate, up and down projections of one expert

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def layer(self, layer: int, rest: str) -> str:
        return f"model.layers.{layer}.{rest}"

    def attn(self, layer: int, proj: str, kind: str = "weight") -> str:
        return self.layer(layer, f"self_attn.{proj}.{kind}")

    def moe(self, layer: int, rest: str) -> str:
        return self.layer(layer, f"{self.moe_block}.{rest}")

    def router_gate(self, layer: int) -> str:
        return self.moe(layer, "gate.weight")

    def expert(self, layer: int, expert: int, which: int) -> str:
        """Name of projection `which` (0 gate, 1 up, 2 down) of one expert."""
        return self.moe(layer, f"experts.{expert}.{self.experts[which]}.weight")

    def fused_experts(self, layer: int, which: str) -> str:
        """Newer checkpoints stack all experts of a layer: `experts.gate_up_proj` / `experts.down_proj`."""
        return self.moe(layer, f"experts.{which}")

    def mlp(self, layer: int, proj: str) -> str:
        return self.layer(layer, f"mlp.{proj}.weight")

    def shared_expert(self, layer: int, proj: str) -> str:
        return self.moe(layer, f"shared_expert.{proj}.weight")

    def shared_expert_gate(self, layer: int) -> str:
        return self.moe(layer, "shared_expert_gate.weight")
