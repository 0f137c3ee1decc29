"""The paged KV cache: one pool of fixed-size blocks per layer, bounded in bytes, and its allocator."""

from __future__ import annotations

from collections import deque

import torch

from moe_core.config import MoeConfig


def bytes_per_token(cfg: MoeConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token across all layers."""
    return 2 * cfg.num_hidden_layers * cfg.kv_size * torch.finfo(dtype).bits // 8


class KvCache:
    """Key/value pools `[layers][blocks * block_size, kv_heads, head_dim]`."""

    def __init__(self, cfg: MoeConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (cfg.num_hidden_layers, num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.num_hidden_layers)]

    @classmethod
    def from_budget(cls, cfg: MoeConfig, budget_bytes: int, block_size: int, dtype: torch.dtype,
                    device: str) -> KvCache:
        num_blocks = budget_bytes // (bytes_per_token(cfg, dtype) * block_size)
        if num_blocks < 1:
            raise ValueError(f"KV-cache budget of {budget_bytes} bytes holds no block of {block_size} tokens")
        return cls(cfg, num_blocks, block_size, dtype, device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
