"""One model step over a flat batch of token rows: decode rows first, then prefill chunks.

The step is written as a generator (`layer_program`) that yields each MoE layer's expert call and
receives its output, so the routed experts can run anywhere: `forward_step` answers every call at
once (experts in this process, or one blocking round trip), and `forward_overlapped` interleaves
two micro-batches so that one's attention runs while the other's experts are in flight. The rest
is the dense math of `model.py` and the paged attention of `attention.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moe_core import paged_attention
from moe_core.attention import (
    DecodeGroup,
    decode_attention,
    decode_attention_each,
    decode_dtype,
    decode_groups,
    prefill_attention,
    write_kv,
)
from moe_core.model import (
    DenseModel,
    lm_logits,
    output_projection,
    project_qkv,
    rms_norm,
    route,
    shared_expert,
    swiglu,
)
from moe_core.weights import DenseLayer

KvLayer = tuple[torch.Tensor, torch.Tensor]  # flat [slots, kv_heads, D] key and value pools


@dataclass
class PrefillChunk:
    """`length` prompt tokens of one sequence at positions start.., rows row.. of the batch."""

    row: int
    length: int
    start: int
    context_slots: torch.Tensor | None = None  # cache slots of positions [0, start + length) when start > 0


@dataclass
class StepBatch:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] where each row's key and value are stored
    num_decode: int = 0  # rows [0, num_decode) are single decode tokens, one per sequence
    block_tables: torch.Tensor | None = None  # [num_decode, blocks]
    decode_lengths: list[int] = field(default_factory=list)  # [num_decode] context lengths, the new token included
    decode_groups: list[DecodeGroup] | None = None  # planned at the step's first layer, shared by all
    decode_length_tensor: torch.Tensor | None = None  # decode_lengths as a tensor, made once per step
    paged_decode: bool | None = None  # whether the paged kernel runs this step's decode rows, asked once
    # each prefill / decode row's result independent of the rest of the step (for the expert-output cache)
    invariant_prefill: bool = False
    invariant_decode: bool = False
    prefills: list[PrefillChunk] = field(default_factory=list)
    logit_rows: torch.Tensor | None = None  # rows whose next-token logits are wanted
    request_ids: list[str] = field(default_factory=list)  # the requests in the step, for logs downstream
    step_id: int = -1  # tells one step's layers from the next step's (the engine counts them); -1: unknown


@dataclass
class ExpertCall:
    """One MoE layer's routed-expert work: rows [T, H], gate weights [T, k] float32, expert ids [T, k]."""

    layer: int
    x: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    num_decode: int = 0  # rows [0, num_decode) are decode tokens, the rest prompt tokens
    request_ids: list[str] = field(default_factory=list)
    step_id: int = -1  # the same for every layer of one step's batch, in the same row order; -1: unknown


class ExpertHandle(Protocol):
    def result(self) -> torch.Tensor: ...


Program = Generator[ExpertCall, torch.Tensor, torch.Tensor]
ExpertFn = Callable[[ExpertCall], torch.Tensor]  # one layer's expert call -> weighted expert sum [T, H]


def layer_program(model: DenseModel, kv: list[KvLayer], block_size: int, batch: StepBatch) -> Program:
    """Every layer over the batch, filling the KV cache; yields expert calls; returns float32 logits."""
    eps = model.cfg.rms_norm_eps
    h = model.weights.embed[batch.token_ids]  # [T, H]
    cos, sin = model.rotary.cos_sin(batch.positions, model.dtype)
    for index, layer in enumerate(model.weights.layers):
        x = rms_norm(h, layer.input_norm, eps)
        h = h + attention_block(model, index, layer, x, cos, sin, kv[index], block_size, batch)
        x = rms_norm(h, layer.post_norm, eps)
        if layer.mlp is not None:
            h = h + swiglu(x, layer.mlp)
            continue
        weights, ids = route(model.cfg, layer.router, x)
        out = yield ExpertCall(index, x, weights, ids, batch.num_decode, batch.request_ids, batch.step_id)
        if layer.shared is not None:
            out = out + shared_expert(layer, x)
        h = h + out
    return lm_logits(model, h if batch.logit_rows is None else h[batch.logit_rows])


def forward_step(model: DenseModel, kv: list[KvLayer], block_size: int, batch: StepBatch,
                 experts: ExpertFn) -> torch.Tensor:
    """Run every layer over the batch, fill the KV cache, return float32 logits [len(logit_rows), V]."""
    program = layer_program(model, kv, block_size, batch)
    try:
        call = next(program)
        while True:
            call = program.send(experts(call))
    except StopIteration as done:
        return done.value


def forward_overlapped(programs: list[Program], submit: Callable[[ExpertCall], ExpertHandle]) -> list[torch.Tensor]:
    """Run micro-batch programs round-robin: while one's experts are in flight, the next one computes.

    With two programs A and B: A's attention, submit A; B's attention, submit B; wait A, A's next
    layer up to its experts, submit A; wait B, ... The network time of one hides behind the other's
    compute (the two-batch overlap of MegaScale-Infer and DeepSeek's inference system).
    """
    results: list[torch.Tensor | None] = [None] * len(programs)
    handles: list[ExpertHandle | None] = []
    for program in programs:
        handles.append(_advance(program, None, submit, results, len(handles)))
    while any(h is not None for h in handles):
        for i, program in enumerate(programs):
            if handles[i] is not None:
                handles[i] = _advance(program, handles[i].result(), submit, results, i)
    return results  # type: ignore[return-value]


def _advance(program: Program, value: torch.Tensor | None, submit, results: list, index: int) -> ExpertHandle | None:
    try:
        call = program.send(value) if value is not None else next(program)
    except StopIteration as done:
        results[index] = done.value
        return None
    return submit(call)


def attention_block(model: DenseModel, index: int, layer: DenseLayer, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, cache: KvLayer, block_size: int, batch: StepBatch) -> torch.Tensor:
    cfg = model.cfg
    q, k, v = project_qkv(cfg, layer.attn, x, cos, sin)
    cache_k, cache_v = cache
    write_kv(cache_k, cache_v, batch.slots, k, v)
    window, scale = cfg.sliding_window(index), cfg.head_dim**-0.5
    out = torch.empty_like(q)
    d = batch.num_decode
    if d and batch.paged_decode is None:  # the same answer for every layer's cache
        batch.paged_decode = paged_attention.usable(q, cache_k, cache_v)
    if d and batch.paged_decode:  # batch-invariant by construction: serves both cases
        if batch.decode_length_tensor is None:
            batch.decode_length_tensor = torch.tensor(batch.decode_lengths)
        out[:d] = paged_attention.decode(q[:d], cache_k, cache_v, batch.block_tables, batch.decode_length_tensor,
                                         block_size, scale, window)
    elif d and batch.invariant_decode:
        out[:d] = decode_attention_each(q[:d], cache_k, cache_v, batch.block_tables, batch.decode_lengths,
                                        block_size, scale, window)
    elif d:
        if batch.decode_groups is None:
            key_row_bytes = 2 * cache_k.shape[1] * cache_k.shape[2] * decode_dtype(q).itemsize
            batch.decode_groups = decode_groups(batch.block_tables, batch.decode_lengths, block_size, key_row_bytes)
        out[:d] = decode_attention(q[:d], cache_k, cache_v, batch.decode_groups, block_size, scale, window)
    for chunk in batch.prefills:
        rows = slice(chunk.row, chunk.row + chunk.length)
        if chunk.start == 0:
            keys, values = k[rows], v[rows]
        else:
            keys, values = cache_k[chunk.context_slots], cache_v[chunk.context_slots]
        out[rows] = prefill_attention(q[rows], keys, values, chunk.start, scale, window,
                                      aligned=batch.invariant_prefill)
    return output_projection(layer.attn, out)


def sequence_logits(model: DenseModel, experts: ExpertFn, token_ids: list[int]) -> torch.Tensor:
    """Logits [len(token_ids), V] of one whole sequence, with a throwaway cache (scoring, tests)."""
    cfg, n = model.cfg, len(token_ids)
    shape = (n, cfg.num_key_value_heads, cfg.head_dim)
    kv = [(torch.empty(shape, dtype=model.dtype, device=model.device),
           torch.empty(shape, dtype=model.dtype, device=model.device)) for _ in range(cfg.num_hidden_layers)]
    rows = torch.arange(n, device=model.device)
    batch = StepBatch(token_ids=torch.tensor(token_ids, device=model.device), positions=rows, slots=rows,
                      prefills=[PrefillChunk(row=0, length=n, start=0)], logit_rows=rows)
    return forward_step(model, kv, 1, batch, experts)
