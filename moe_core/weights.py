"""Model weights as plain tensors, loaded from a checkpoint through the family's name map.

The dense part (what the router runs) and the experts (what expert services run) load apart:
`load_dense` never touches an expert tensor, and `load_experts` reads only the (layer, expert)
pairs it is given. Projections that run together are fused at load time (q|k|v, gate|up) so a
step issues one matmul where the checkpoint has two or three.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from moe_core import bf16_gemm
from moe_core.checkpoint import Checkpoint
from moe_core.config import MoeConfig
from moe_core.errors import CheckpointError
from moe_core.linear import Linear
from moe_core.placement import ffn_range

PROGRESS_MIN_BYTES = 256 * 2**20


@dataclass
class Mlp:
    gate_up: Linear  # [2 * I, H]: gate and up projections fused
    down: Linear  # [H, I]


@dataclass
class Attention:
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, H], with the q/k/v biases where the family has them
    o: Linear  # [H, heads * head_dim]
    q_norm: torch.Tensor | None  # [head_dim] ("head") or [heads * head_dim] ("full")
    k_norm: torch.Tensor | None


@dataclass
class DenseLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: Attention
    router: Linear | None = None  # [experts, H] on MoE layers
    shared: Mlp | None = None
    shared_gate: Linear | None = None  # [1, H]
    mlp: Mlp | None = None  # dense layers only


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[DenseLayer]
    final_norm: torch.Tensor
    lm_head: Linear  # [V, H]


@dataclass
class LayerExperts:
    """The experts of one layer that one process holds."""

    layer: int
    expert_ids: list[int]
    gate_up: list[Linear]  # per local expert: [2 * I, H]
    down: list[Linear]  # per local expert: [H, I]
    local_of: torch.Tensor  # [num_experts] int64: local index, or -1 where not held here
    kernel: bf16_gemm.LayerKernel | None = field(init=False)  # all of them in one native call, where it runs
    local_list: list[int] = field(init=False)  # local_of as Python ints: reading it on a GPU would sync every layer

    def __post_init__(self) -> None:
        self.local_list = self.local_of.tolist()
        on_cpu = self.local_of.device.type == "cpu"
        self.kernel = bf16_gemm.layer_kernel(self.gate_up, self.down, self.local_of) if on_cpu else None


class _Reader:
    """Reads named tensors with a byte-progress bar when the load is large."""

    def __init__(self, ckpt: Checkpoint, keys: list[str], dtype: torch.dtype, device: str, desc: str):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        total = sum(ckpt.nbytes(k.split("[")[0]) for k in keys if k.split("[")[0] in ckpt)
        show = total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show, leave=False)

    def __call__(self, key: str, shape: tuple[int, ...], index: int | slice | tuple | None = None) -> torch.Tensor:
        tensor = self.ckpt.read(key, self.dtype, self.device, index=index)
        self.bar.update(tensor.numel() * tensor.element_size())
        return self.ckpt.expect_shape(key, tensor, shape)

    def optional(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self(key, shape) if key in self.ckpt else None

    def close(self) -> None:
        self.bar.close()


def _dense_keys(cfg: MoeConfig) -> list[str]:
    n = cfg.names
    keys = [n.embed, n.final_norm, n.lm_head]
    for layer in range(cfg.num_hidden_layers):
        keys += [n.layer(layer, "input_layernorm.weight"), n.layer(layer, "post_attention_layernorm.weight")]
        keys += [n.attn(layer, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return keys


def load_dense(ckpt: Checkpoint, cfg: MoeConfig, dtype: torch.dtype, device: str = "cpu") -> DenseWeights:
    """Everything but the routed experts: embeddings, attention, norms, router gates, shared experts, LM head."""
    n, h = cfg.names, cfg.hidden_size
    read = _Reader(ckpt, _dense_keys(cfg), dtype, device, "dense weights")
    embed = read(n.embed, (cfg.vocab_size, h))
    if cfg.tie_word_embeddings or n.lm_head not in ckpt:
        if not cfg.tie_word_embeddings:
            raise CheckpointError(f"{ckpt.dir}: tensor '{n.lm_head}' not found and tie_word_embeddings is false")
        lm_head = Linear(embed)
    else:
        lm_head = Linear(read(n.lm_head, (cfg.vocab_size, h)))
    layers = [_load_layer(read, cfg, layer) for layer in range(cfg.num_hidden_layers)]
    final_norm = read(n.final_norm, (h,))
    read.close()
    return DenseWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _load_layer(read: _Reader, cfg: MoeConfig, layer: int) -> DenseLayer:
    n, h = cfg.names, cfg.hidden_size
    dense = DenseLayer(
        input_norm=read(n.layer(layer, "input_layernorm.weight"), (h,)),
        post_norm=read(n.layer(layer, "post_attention_layernorm.weight"), (h,)),
        attn=_load_attention(read, cfg, layer),
    )
    if cfg.is_moe_layer(layer):
        dense.router = Linear(read(n.router_gate(layer), (cfg.num_experts, h)))
        if cfg.shared_expert_intermediate_size:
            size = cfg.shared_expert_intermediate_size
            dense.shared = _load_mlp(read, lambda p: n.shared_expert(layer, p), size, h)
            dense.shared_gate = Linear(read(n.shared_expert_gate(layer), (1, h)))
    else:
        dense.mlp = _load_mlp(read, lambda p: n.mlp(layer, p), cfg.intermediate_size, h)
    return dense


def _load_attention(read: _Reader, cfg: MoeConfig, layer: int) -> Attention:
    n, h = cfg.names, cfg.hidden_size
    q = read(n.attn(layer, "q_proj"), (cfg.q_size, h))
    k = read(n.attn(layer, "k_proj"), (cfg.kv_size, h))
    v = read(n.attn(layer, "v_proj"), (cfg.kv_size, h))
    bias = None
    if cfg.qkv_bias:
        sizes = {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size}
        bias = torch.cat([read(n.attn(layer, p, "bias"), (s,)) for p, s in sizes.items()])
    norm_sizes = {"none": None, "head": (cfg.head_dim, cfg.head_dim), "full": (cfg.q_size, cfg.kv_size)}[cfg.qk_norm]
    q_norm = k_norm = None
    if norm_sizes:
        q_norm = read(n.attn(layer, "q_norm"), (norm_sizes[0],))
        k_norm = read(n.attn(layer, "k_norm"), (norm_sizes[1],))
    o_bias = read(n.attn(layer, "o_proj", "bias"), (h,)) if cfg.o_bias else None
    return Attention(qkv=Linear(torch.cat([q, k, v]), bias), o=Linear(read(n.attn(layer, "o_proj"), (h, cfg.q_size)),
                                                                      o_bias),
                     q_norm=q_norm, k_norm=k_norm)


def _load_mlp(read: _Reader, name, size: int, h: int) -> Mlp:
    gate = read(name("gate_proj"), (size, h))
    up = read(name("up_proj"), (size, h))
    return Mlp(gate_up=Linear(torch.cat([gate, up])), down=Linear(read(name("down_proj"), (h, size))))


def all_expert_pairs(cfg: MoeConfig) -> list[tuple[int, int]]:
    return [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]


def load_experts(ckpt: Checkpoint, cfg: MoeConfig, pairs: Iterable[tuple[int, int]] | None,
                 dtype: torch.dtype, device: str = "cpu", ffn: tuple[int, int] = (0, 1)) -> dict[int, LayerExperts]:
    """The experts in `pairs` (all of them when None), grouped by layer; reads nothing else.

    `ffn` (part, parts) keeps only that slice of each expert's intermediate dimension (placement.ffn_range):
    the experts' output is then that part's share of the sum."""
    wanted = sorted(set(all_expert_pairs(cfg) if pairs is None else pairs))
    for layer, expert in wanted:
        if layer not in cfg.moe_layers or not 0 <= expert < cfg.num_experts:
            raise CheckpointError(f"{ckpt.dir}: no expert ({layer}, {expert}) in this model "
                                  f"(MoE layers {cfg.moe_layers}, {cfg.num_experts} experts)")
    keys = [cfg.names.expert(layer, e, w) for layer, e in wanted for w in range(3)]
    read = _Reader(ckpt, keys, dtype, device, "experts")
    by_layer: dict[int, list[int]] = {}
    for layer, expert in wanted:
        by_layer.setdefault(layer, []).append(expert)
    out = {layer: _load_layer_experts(read, cfg, layer, ids, device, ffn) for layer, ids in by_layer.items()}
    read.close()
    return out


def _load_layer_experts(read: _Reader, cfg: MoeConfig, layer: int, ids: list[int], device: str,
                        ffn: tuple[int, int]) -> LayerExperts:
    n, h, size = cfg.names, cfg.hidden_size, cfg.moe_intermediate_size
    gate_ups, downs = [], []
    fused = n.fused_experts(layer, "gate_up_proj") in read.ckpt and n.expert(layer, ids[0], 0) not in read.ckpt
    mine = ffn_range(size, ffn)
    width = mine.stop - mine.start
    ups = slice(size + mine.start, size + mine.stop)  # in a fused [2 * I, H] gate_up: gate rows, then up rows
    every = slice(None)
    for e in ids:
        if fused and ffn[1] == 1:
            gate_up = read(n.fused_experts(layer, "gate_up_proj"), (2 * size, h), index=e)
            down = read(n.fused_experts(layer, "down_proj"), (h, size), index=e)
        elif fused:  # only this FFN part's rows and columns are read
            gate_up = torch.cat([read(n.fused_experts(layer, "gate_up_proj"), (width, h), index=(e, mine)),
                                 read(n.fused_experts(layer, "gate_up_proj"), (width, h), index=(e, ups))])
            down = read(n.fused_experts(layer, "down_proj"), (h, width), index=(e, every, mine))
        elif ffn[1] == 1:
            gate_up = torch.cat([read(n.expert(layer, e, 0), (size, h)), read(n.expert(layer, e, 1), (size, h))])
            down = read(n.expert(layer, e, 2), (h, size))
        else:
            gate_up = torch.cat([read(n.expert(layer, e, 0), (width, h), index=mine),
                                 read(n.expert(layer, e, 1), (width, h), index=mine)])
            down = read(n.expert(layer, e, 2), (h, width), index=(every, mine))
        gate_ups.append(Linear(gate_up))
        downs.append(Linear(down))
    local_of = torch.full((cfg.num_experts,), -1, dtype=torch.int64)
    local_of[ids] = torch.arange(len(ids))
    return LayerExperts(layer=layer, expert_ids=list(ids), gate_up=gate_ups, down=downs, local_of=local_of.to(device))
