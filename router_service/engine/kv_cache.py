"""The paged KV cache: one pool of fixed-size blocks per layer, bounded in bytes, and its allocator."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

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
    """Free KV blocks, and with prefix caching the full blocks kept by the tokens they hold.

    A full block's key is (key serial of the block before it, its tokens), so a lookup walks the
    prompt block by block and a hit means the whole prefix up to that block is the same: exact
    token comparison, no hash collisions. Blocks in use carry a reference count; a cached block
    whose last user finished stays evictable (least recently used first) until a new block is
    needed, so a repeated prompt, a shared system prompt or a preempted sequence finds its keys
    and values still there and skips their prefill.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = False):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first
        self._by_key: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # key -> (serial, block)
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its key
        self._serials = itertools.count(1)  # 0 is the empty prefix

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and unused)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = [self._take() for _ in range(n)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._by_key[self._key_of.pop(block)]
        return block

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def match(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], int]:
        """The cached blocks holding the longest prefix of `token_ids` (at most `max_tokens` of
        them), now in use by the caller, and the serial of the last one (0 for none)."""
        bs, blocks, serial = self.block_size, [], 0
        if not self.prefix_caching:
            return blocks, serial
        for start in range(0, max_tokens - bs + 1, bs):
            found = self._by_key.get((serial, tuple(token_ids[start:start + bs])))
            if found is None:
                break
            serial, block = found
            blocks.append(block)
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return blocks, serial

    def register(self, block: int, parent: int, tokens: list[int]) -> int:
        """Record that full `block` holds `tokens` after the prefix `parent`; return its serial.

        When the same content is already cached in another block (two requests prefilled the same
        prompt side by side), that block keeps the entry and this one is freed normally.
        """
        if not self.prefix_caching:
            return 0
        key = (parent, tuple(tokens))
        found = self._by_key.get(key)
        if found is not None:
            return found[0]
        serial = next(self._serials)
        self._by_key[key] = (serial, block)
        self._key_of[block] = key
        return serial
