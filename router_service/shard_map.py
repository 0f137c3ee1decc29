"""Which shard computes which (layer, expert) pair, and the split of one layer's rows into per-shard parts.

Built from what every replica reports in Describe. An expert held by several shards (hot-expert
replication) has its rows spread over its holders round-robin, so each shard still gets one message
per layer step.

Shards may instead each compute one slice of every expert's FFN (Describe's ffn_part / ffn_parts,
moe_core/placement.ffn_split): the shards of each part then form a complete map of their own, every
row goes to one shard of every part, and the parts' partial sums add up to the experts' output.

A decode step's split (a few dozen pairs) runs in Python: between two layer steps the shards' compute
has evicted the router's caches, and the dozen tensor ops of the vectorised split then cost ≈ 0.1–0.5
ms a step, several times what a short loop over the pairs costs (bench/RESULTS.md). Prefill chunks
split with tensor ops; both ways give the same parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_core.config import MoeConfig
from moe_core.errors import ConfigError
from router_service.replica import Replica

SMALL_PAIRS = 256  # at most this many (row, expert) pairs per layer step: split in Python


@dataclass
class Shard:
    shard_id: str
    replicas: list[Replica]
    pairs: set[tuple[int, int]]
    picks: int = 0
    ffn: tuple[int, int] = (0, 1)  # (part, parts) of each expert's FFN it computes

    def pick(self, exclude: set[Replica]) -> Replica | None:
        """The live replica with the fewest calls in flight; among equals, the least recently picked.

        Without the second rule one router, whose steps are sequential, would always find every replica
        idle and send everything to the first.
        """
        live = [r for r in self.replicas if r.live and r not in exclude]
        if not live:
            return None
        chosen = min(live, key=lambda r: (r.load, r.last_pick))
        self.picks += 1
        chosen.last_pick = self.picks
        return chosen

    @property
    def live(self) -> bool:
        return any(r.live for r in self.replicas)


@dataclass
class Part:
    """What one shard gets for one layer step."""

    shard: Shard
    rows: torch.Tensor  # [n] indices into the layer's rows
    ids: torch.Tensor  # [n, k] int32 expert ids, -1 where the pair belongs to another shard
    weights: torch.Tensor  # [n, k] float32


class ShardMap:
    """All shards; the ones computing each FFN part form a `_PartMap`, and a layer step goes to all parts."""

    def __init__(self, cfg: MoeConfig, shards: list[Shard]):
        self.cfg, self.shards = cfg, shards
        counts = sorted({s.ffn[1] for s in shards})
        if len(counts) > 1:
            raise ConfigError(f"shards cut their experts' FFN into different numbers of parts: {counts}")
        parts = counts[0] if counts else 1
        self.parts = [_PartMap(cfg, [s for s in shards if s.ffn == (part, parts)], f"ffn part {part}/{parts}: "
                               if parts > 1 else "") for part in range(parts)]

    def split(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> list[Part]:
        """ids/weights [T, k] -> one Part per shard that has work, in shard order within each FFN part."""
        if len(self.parts) == 1:
            return self.parts[0].split(layer, ids, weights)
        return [part for part_map in self.parts for part in part_map.split(layer, ids, weights)]


class _PartMap:
    """The shards that hold whole experts, or one FFN part of them: each pair goes to one of its holders."""

    def __init__(self, cfg: MoeConfig, shards: list[Shard], what: str = ""):
        self.cfg, self.shards = cfg, shards
        missing = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)
                   if not any((layer, e) in s.pairs for s in shards)]
        if missing:
            raise ConfigError(f"{what}no shard holds experts {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        self.holders = {layer: self._holder_table(layer) for layer in cfg.moe_layers}
        self.holder_lists = {layer: [row[:count] for row, count in zip(table.tolist(), counts.tolist(), strict=True)]
                             for layer, (table, counts) in self.holders.items()}
        # Layers whose experts all live on one shard (a placement split by layers) skip the split entirely.
        self.sole = {layer: table[0, 0].item() for layer, (table, counts) in self.holders.items()
                     if bool((table == table[0, 0]).all()) and bool((counts == 1).all())}

    def _holder_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[experts, most holders] shard indices (padded by repetition) and [experts] holder counts."""
        holders = [[i for i, s in enumerate(self.shards) if (layer, e) in s.pairs]
                   for e in range(self.cfg.num_experts)]
        width = max(len(h) for h in holders)
        table = torch.tensor([[h[j % len(h)] for j in range(width)] for h in holders], dtype=torch.int64)
        return table, torch.tensor([len(h) for h in holders], dtype=torch.int64)

    def split(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> list[Part]:
        # The tables are on the CPU, and so is every part: it goes on the wire from there. A router on a GPU
        # copies the step's routing here once (torch refuses a CPU table indexed by CUDA ids).
        ids, weights = ids.cpu(), weights.cpu()
        if layer in self.sole:
            return [Part(self.shards[self.sole[layer]], torch.arange(ids.shape[0]), ids.to(torch.int32),
                         weights.float())]
        if ids.numel() <= SMALL_PAIRS:
            return self._split_small(layer, ids, weights)
        table, counts = self.holders[layer]
        rows = torch.arange(ids.shape[0])[:, None]
        owner = table[ids, rows % counts[ids]]  # [T, k] shard index of every pair
        parts = []
        for index in torch.unique(owner).tolist():
            mine = owner == index
            selected = mine.any(dim=1).nonzero()[:, 0]
            keep = mine[selected]
            parts.append(Part(self.shards[index], selected,
                              torch.where(keep, ids[selected], -1).to(torch.int32),
                              torch.where(keep, weights[selected], 0.0).float()))
        return parts

    def _split_small(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> list[Part]:
        holders = self.holder_lists[layer]
        k = ids.shape[1]
        by_shard: dict[int, tuple[list[int], list[int], list[float]]] = {}
        for row, (row_ids, row_weights) in enumerate(zip(ids.tolist(), weights.tolist(), strict=True)):
            owners = [holders[e][row % len(holders[e])] for e in row_ids]
            for index in set(owners):
                rows, part_ids, part_weights = by_shard.setdefault(index, ([], [], []))
                rows.append(row)
                for j in range(k):
                    mine = owners[j] == index
                    part_ids.append(row_ids[j] if mine else -1)
                    part_weights.append(row_weights[j] if mine else 0.0)
        return [Part(self.shards[index], torch.tensor(rows, dtype=torch.int64),
                     torch.tensor(part_ids, dtype=torch.int32).view(-1, k),
                     torch.tensor(part_weights, dtype=torch.float32).view(-1, k))
                for index, (rows, part_ids, part_weights) in sorted(by_shard.items())]
