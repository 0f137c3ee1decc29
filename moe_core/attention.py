"""Causal self-attention over a paged KV cache, as pure tensor functions.

The cache of one layer is a flat pool of token slots `[blocks * block_size, kv_heads, D]`; a
sequence owns a list of blocks (its block table). Decode rows (one new token per sequence) run as
one batched call; prefill chunks run one sequence at a time, each attending to its cached prefix
plus its own causal part. Grouped-query attention uses SDPA's `enable_gqa` instead of repeating KV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, block_size: int, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """q [B, heads, D] (the token at position context_len - 1 of each sequence) -> [B, heads, D]."""
    k = gather_blocks(cache_k, block_tables, block_size).transpose(1, 2)  # [B, kv_heads, L, D]
    v = gather_blocks(cache_v, block_tables, block_size).transpose(1, 2)
    key_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    allowed = key_pos < context_lens[:, None]  # [B, L]
    if window is not None:
        allowed &= key_pos > context_lens[:, None] - 1 - window
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=allowed[:, None, None, :], scale=scale, enable_gqa=True)
    return out[:, :, 0, :]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """One sequence: q [n, heads, D] at positions start.., k/v [start + n, kv_heads, D] -> [n, heads, D]."""
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
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
