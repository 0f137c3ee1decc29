"""Routed-expert compute: grouped SwiGLU over the rows sent to each expert, weighted and summed.

Input is one layer's token rows with their (expert id, weight) pairs; output is one row per token:
the weighted sum of the outputs of the experts this process holds. An id of -1 marks an empty
pair slot (a row routed to fewer of this shard's experts than the widest row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.weights import LayerExperts


class UnknownExpertError(ValueError):
    """A row names an expert this process does not hold."""


def expert_forward(experts: LayerExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [T, H], ids [T, k] int64 (global ids, -1 = none), weights [T, k] -> [T, H] in x's dtype."""
    t, k = ids.shape
    flat_ids = ids.reshape(-1)
    used = flat_ids >= 0
    local = torch.where(used, experts.local_of[flat_ids.clamp(min=0)], torch.full_like(flat_ids, -1))
    missing = used & (local < 0)
    if bool(missing.any()):
        unknown = sorted(set(flat_ids[missing].tolist()))
        raise UnknownExpertError(f"layer {experts.layer}: experts {unknown} are not held here "
                                 f"(held: {experts.expert_ids})")
    rows = torch.arange(t, device=x.device).repeat_interleave(k)[used]
    local, pair_w = local[used], weights.reshape(-1)[used]
    order = torch.argsort(local, stable=True)
    rows, local, pair_w = rows[order], local[order], pair_w[order]
    counts = torch.bincount(local, minlength=len(experts.expert_ids)).tolist()
    xs = x[rows]  # [pairs, H]: one gather, grouped by expert
    ys = torch.empty(xs.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count:
            seg = xs[start:start + count]
            gate, up = F.linear(seg, experts.gate_up[e]).chunk(2, dim=-1)
            ys[start:start + count] = F.linear(F.silu(gate) * up, experts.down[e]).float()
            start += count
    ys.mul_(pair_w[:, None].float())
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, ys)
    return out.to(x.dtype)
