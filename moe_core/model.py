"""The dense part of an MoE transformer as pure tensor functions.

Embeddings, RMSNorm, the attention projections with their per-family norms and RoPE, the router
gate (softmax → top-k → optional renormalisation, exactly as each reference does it), dense and
shared-expert MLPs, and the LM head. The routed experts are computed elsewhere (`experts.py`),
locally or on expert services; this file never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_core import bf16_gemm
from moe_core.config import MoeConfig
from moe_core.linear import Linear
from moe_core.rope import Rotary, apply_rotary
from moe_core.weights import Attention, DenseLayer, DenseWeights, Mlp


@dataclass
class DenseModel:
    """A config, its dense weights and the rotary tables: everything the router computes with."""

    cfg: MoeConfig
    weights: DenseWeights
    rotary: Rotary

    @classmethod
    def build(cls, cfg: MoeConfig, weights: DenseWeights) -> DenseModel:
        return cls(cfg, weights, Rotary(cfg.rope, cfg.head_dim, weights.embed.device))

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back, then scale: the order Hugging Face models use. bfloat16 rows on CPUs
    with the bf16 GEMM take one native pass (`bf16_gemm.rms_norm`)."""
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and bf16_gemm.norm_wanted()):
        return bf16_gemm.rms_norm(x, weight, eps)
    return torch_rms_norm(x, weight, eps)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` in torch's ops, whatever the dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(x: torch.Tensor, mlp: Mlp) -> torch.Tensor:
    gate, up = mlp.gate_up(x).chunk(2, dim=-1)  # [T, I] each
    return mlp.down(F.silu(gate) * up)


def project_qkv(cfg: MoeConfig, attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] -> q [T, heads, D], k and v [T, kv_heads, D], normed, clipped and rotated per family."""
    t, d, eps = x.shape[0], cfg.head_dim, cfg.rms_norm_eps
    qkv = attn.qkv(x)
    if cfg.qk_norm == "none" and cfg.clip_qkv is None:
        # q and k side by side are one tensor of heads: one rotation for both, half the small ops of a
        # decode step's attention (each op costs a few microseconds at concurrency 1)
        heads, qk_size = cfg.q_size // d, cfg.q_size + cfg.kv_size
        qk = apply_rotary(qkv[:, :qk_size].reshape(t, -1, d), cos, sin)
        return qk[:, :heads].contiguous(), qk[:, heads:].contiguous(), qkv[:, qk_size:].reshape(t, -1, d)
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    if cfg.qk_norm == "full":  # OLMoE: one norm over the whole projection
        q, k = rms_norm(q, attn.q_norm, eps), rms_norm(k, attn.k_norm, eps)
    if cfg.clip_qkv is not None:
        c = cfg.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    q, k, v = q.reshape(t, -1, d), k.reshape(t, -1, d), v.reshape(t, -1, d)
    if cfg.qk_norm == "head":  # Qwen3-MoE: a norm per head
        q, k = rms_norm(q, attn.q_norm, eps), rms_norm(k, attn.k_norm, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def output_projection(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """o [T, heads, D] -> [T, H]."""
    return attn.o(o.reshape(o.shape[0], -1))


def route(cfg: MoeConfig, router: Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate -> (weights [T, k] float32, expert ids [T, k] int64): softmax, top-k, renormalise if asked."""
    probs = torch.softmax(router(x).float(), dim=-1)  # [T, experts]
    weights, ids = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def shared_expert(layer: DenseLayer, x: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE's always-on expert, scaled by its own sigmoid gate."""
    return torch.sigmoid(layer.shared_gate(x)) * swiglu(x, layer.shared)


def lm_logits(model: DenseModel, h: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head for the rows that need a next token; logits in float32."""
    w = model.weights
    return w.lm_head(rms_norm(h, w.final_norm, model.cfg.rms_norm_eps)).float()
