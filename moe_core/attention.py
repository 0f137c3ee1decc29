"""Causal self-attention over a paged KV cache, as pure tensor functions.

The cache of one layer is a flat pool of token slots `[blocks * block_size, kv_heads, D]`; a
sequence owns a list of blocks (its block table). Decode rows (one new token per sequence) run as
batched calls over groups of similar context length (`decode_groups`), or one call per sequence
(`decode_attention_each`); prefill chunks run one sequence at a time, each attending to its cached
prefix plus its own causal part, in one call or in blocks aligned to position 0. Grouped-query
attention uses SDPA's `enable_gqa` instead of repeating KV.

The invariant forms exist so that a row's output bits never depend on the rest of the step or on
where a prompt was cut into chunks, which the expert-output cache needs to hit on repeated requests.
They run only when asked for (`StepBatch.invariant_prefill` / `invariant_decode`, set for the phases
the cache is on for): the batched decode call is faster (bench/RESULTS.md, "Expert-output cache").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe_core.dtypes import cpu_has_amx_bf16


def write_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v [T, kv_heads, D] at flat cache positions `slots` [T]."""
    cache_k.index_copy_(0, slots, k.to(cache_k.dtype))
    cache_v.index_copy_(0, slots, v.to(cache_v.dtype))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, blocks] block ids -> the cached [B, blocks * block_size, kv_heads, D], in position order.

    Copies whole blocks (index_select over block rows), which runs ~4x faster than indexing token slots.
    """
    b, nb = block_tables.shape
    rows = cache.view(-1, block_size * cache.shape[1] * cache.shape[2])  # [blocks, block_size * kv_heads * D]
    return rows.index_select(0, block_tables.reshape(-1)).view(b, nb * block_size, cache.shape[1], cache.shape[2])


# What one more batched decode call costs, in bytes of padded keys and values it would otherwise read:
# about 60 µs of launch and gather overhead against ~0.2 µs per padded key row of bench-s in float32
# (1 KiB of K+V) on a 2-core EPYC (bench/RESULTS.md, "Decode attention in length groups").
GROUP_CALL_BYTES = 256 << 10


@dataclass
class DecodeGroup:
    """Decode rows that run as one SDPA call, their keys padded to the group's longest context."""

    rows: torch.Tensor | None  # indices into the step's decode rows; None: all of them, in order
    tables: torch.Tensor  # [n, keys // block_size] block ids
    lengths: torch.Tensor  # [n] context lengths, the new token included
    keys: int  # key positions the call reads (the longest context, rounded up to whole blocks)
    allowed: torch.Tensor | None  # [n, keys] key positions inside each context; None: all of them
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)  # sliding window -> its mask, made once

    def mask(self, window: int | None) -> torch.Tensor | None:
        """`allowed`, narrowed to the last `window` positions of each context; the same for every layer."""
        if window is None:
            return self.allowed
        if window not in self.windowed:
            key_pos = torch.arange(self.keys, device=self.lengths.device)[None, :]
            inside = key_pos > self.lengths[:, None] - 1 - window
            self.windowed[window] = inside if self.allowed is None else self.allowed & inside
        return self.windowed[window]


def decode_groups(block_tables: torch.Tensor, lengths: list[int], block_size: int, key_row_bytes: int,
                  call_bytes: int | None = None) -> list[DecodeGroup]:
    """Split a step's decode rows into groups of similar context length, computed once per step.

    One batched call pads every sequence to the longest context of the step, and decode attention
    is bound by the bytes of K/V it gathers and reads: with contexts of 40 to 600 tokens, half of them
    are padding. Sorting by length and cutting where the padding saved outweighs one more call
    (`call_bytes`, GROUP_CALL_BYTES by default) reads only what is needed; an exact dynamic program over
    the sorted lengths.
    """
    blocks = [-(-n // block_size) for n in lengths]
    if block_tables.device.type != "cpu":
        # The cost model above is a 2-core CPU's. On a GPU each extra call is a handful of kernel launches and
        # the padded keys cost next to nothing: one call for the step (a guess, not yet measured on one).
        return [_group(block_tables, lengths, None, max(blocks, default=0), block_size)]
    order = sorted(range(len(lengths)), key=blocks.__getitem__)
    sorted_blocks = [blocks[i] for i in order]
    call = (GROUP_CALL_BYTES if call_bytes is None else call_bytes) / (key_row_bytes * block_size)  # in blocks
    best, cut = [0.0], [0]
    for j in range(1, len(order) + 1):
        top = sorted_blocks[j - 1]
        cost, start = min((best[i] + (j - i) * top, i) for i in range(j))
        best.append(cost + call)
        cut.append(start)
    if cut[-1] == 0:  # one group: keep the step's order, nothing to gather or scatter
        return [_group(block_tables, lengths, None, max(blocks, default=0), block_size)]
    groups, j = [], len(order)
    while j:
        i = cut[j]
        groups.append(_group(block_tables, lengths, order[i:j], sorted_blocks[j - 1], block_size))
        j = i
    return groups


def _group(block_tables: torch.Tensor, lengths: list[int], members: list[int] | None, blocks: int,
           block_size: int) -> DecodeGroup:
    device = block_tables.device
    rows = None if members is None else torch.tensor(members, device=device)
    own = lengths if members is None else [lengths[i] for i in members]
    lens = torch.tensor(own, device=device)
    keys = blocks * block_size
    allowed = None
    if any(n != keys for n in own):
        allowed = torch.arange(keys, device=device)[None, :] < lens[:, None]
    tables = block_tables if rows is None else block_tables.index_select(0, rows)
    return DecodeGroup(rows, tables[:, :blocks], lens, keys, allowed)


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, groups: list[DecodeGroup],
                     block_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """q [B, heads, D] (the token at position length - 1 of each sequence) -> [B, heads, D]."""
    dtype = decode_dtype(q)
    out = torch.empty_like(q) if len(groups) > 1 else None
    for group in groups:
        k = gather_blocks(cache_k, group.tables, block_size).transpose(1, 2)  # [n, kv_heads, keys, D]
        v = gather_blocks(cache_v, group.tables, block_size).transpose(1, 2)
        allowed = group.mask(window)
        rows = q if group.rows is None else q.index_select(0, group.rows)
        o = F.scaled_dot_product_attention(
            grouped_queries(rows, k.shape[1]).to(dtype), k.to(dtype), v.to(dtype),
            attn_mask=None if allowed is None else allowed[:, None, None, :], scale=scale)
        if out is None:
            return o.reshape(q.shape).to(q.dtype)
        out.index_copy_(0, group.rows, o.reshape(rows.shape).to(q.dtype))
    return out


def grouped_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, heads, D] -> [B, kv_heads, heads // kv_heads, D]: the query heads that share a KV head as
    the rows of one query block. Same result as one query row with `enable_gqa`, but SDPA reads each
    KV head once for its whole group instead of once per query head: about 2x faster on CPU."""
    b, heads, d = q.shape
    return q.view(b, kv_heads, heads // kv_heads, d)


def decode_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype decode attention computes in. On CPU, SDPA's decode kernel in bfloat16 ran about 5x
    slower than in float32 on an AVX-512 BF16 CPU without AMX, and about 1.7x faster on one with AMX
    (bench/RESULTS.md): half types compute in float32 unless the CPU has AMX. Elsewhere the query's."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return q.dtype if q.dtype == torch.bfloat16 and cpu_has_amx_bf16() else torch.float32
    return q.dtype


def decode_attention_each(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_tables: torch.Tensor,
                          lengths: list[int], block_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """`decode_attention`, one sequence at a time over exactly its own tokens.

    The CPU SDPA decode kernel splits its work across threads by the batch size, so one sequence's
    result changes in the last bits with what else is in the batch, and a repeated request's decode
    rows would never match the first's in the expert-output cache. One call per sequence makes each
    output depend only on that sequence's query and cache; in a whole serving run it took about as
    long as the batched call (bench/RESULTS.md, "Expert-output cache").
    """
    # every sequence's own blocks, back to back, in two gathers (per-sequence gathers cost more in calls)
    needed = -(-torch.tensor(lengths, device=block_tables.device) // block_size)
    flat = block_tables[torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < needed[:, None]]
    dtype = decode_dtype(q)
    keys, values = (gather_blocks(cache, flat[None], block_size)[0].to(dtype).transpose(0, 1)  # [kv_heads, T, D]
                    for cache in (cache_k, cache_v))
    # [1, kv_heads, heads // kv_heads, D] each (4-D: with 3-D inputs SDPA takes a ~3x slower path)
    queries = grouped_queries(q, keys.shape[0]).to(dtype)[:, None].unbind(0)
    outs, offset = [], 0
    for query, length in zip(queries, lengths, strict=True):
        own = slice(offset + (max(0, length - window) if window is not None else 0), offset + length)
        outs.append(F.scaled_dot_product_attention(query, keys[None, :, own], values[None, :, own], scale=scale))
        offset += -(-length // block_size) * block_size
    return torch.cat(outs).view(q.shape).to(q.dtype)


PREFILL_BLOCK = 64  # query positions per aligned block of chunk-invariant prefill attention


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
                      window: int | None = None, aligned: bool = False) -> torch.Tensor:
    """One sequence: q [n, heads, D] at positions start.., k/v [start + n, kv_heads, D] -> [n, heads, D].

    With `aligned` the queries run in blocks of PREFILL_BLOCK positions aligned to position 0, each as
    one call of fixed shape (missing rows and keys zero-padded, masked). A row's result then depends
    only on its position and the sequence, not on where the scheduler cut the prompt into chunks: a
    repeated prompt chunked differently still meets the expert-output cache (one SDPA call over the
    chunk changes in the last bits with the chunk's length). It runs as fast as one call from ~300
    tokens up and costs ~0.06 ms more per layer for a short prompt (bench/RESULTS.md).
    """
    if not aligned:
        return _prefill_one_call(q, k, v, start, scale, window)
    n = q.shape[0]
    end = start + n
    top = -(-end // PREFILL_BLOCK) * PREFILL_BLOCK
    keys, values = (_pad_rows(t[:end], top).to(q.dtype).transpose(0, 1)[None] for t in (k, v))  # [1, kv, top, D]
    block_pos = torch.arange(PREFILL_BLOCK, device=q.device)[:, None]
    out = torch.empty_like(q)
    for lo in range(start // PREFILL_BLOCK * PREFILL_BLOCK, end, PREFILL_BLOCK):
        hi = lo + PREFILL_BLOCK
        first, last = max(lo, start), min(hi, end)  # the real query positions of this block
        rows = _pad_rows(q[first - start:last - start], PREFILL_BLOCK, before=first - lo)
        q_pos, k_pos = block_pos + lo, torch.arange(hi, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        o = _masked_sdpa(rows.transpose(0, 1)[None], keys[:, :, :hi], values[:, :, :hi], allowed, scale)
        out[first - start:last - start] = o[0, :, first - lo:last - lo].transpose(0, 1)
    return out


def _pad_rows(x: torch.Tensor, rows: int, before: int = 0) -> torch.Tensor:
    """x with zero rows in front (`before`) and behind, `rows` in all."""
    if before == 0 and x.shape[0] == rows:
        return x
    padded = x.new_zeros(rows, *x.shape[1:])
    padded[before:before + x.shape[0]] = x
    return padded


def _prefill_one_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
                      window: int | None) -> torch.Tensor:
    n, length = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype), v.transpose(0, 1)[None].to(q.dtype)
    if start == 0 and window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(start, start + n, device=q.device)[:, None]
        k_pos = torch.arange(length, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        out = _masked_sdpa(qh, kh, vh, allowed, scale)
    return out[0].transpose(0, 1)


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                 repeat_kv: bool | None = None) -> torch.Tensor:
    """SDPA with a mask, where k and v may have fewer heads than q. On CUDA, grouped heads run only in the flash
    and math kernels and flash takes no mask, so the math kernel would run (a float32 score tensor per head):
    there the KV heads are repeated instead, which the memory-efficient kernel takes with a mask."""
    if (q.device.type != "cpu" if repeat_kv is None else repeat_kv) and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
