"""Routed-expert compute: grouped SwiGLU over the rows sent to each expert, weighted and summed.

Input is one layer's token rows with their (expert id, weight) pairs; output is one row per token:
the weighted sum of the outputs of the experts this process holds. An id of -1 marks an empty
pair slot (a row routed to fewer of this shard's experts than the widest row).

Where every weight runs on the bfloat16 GEMM (`LayerExperts.kernel`; pair dot or AMX tiles), the whole
layer is one native call that computes the same bits as the torch ops below (`bf16_gemm.LayerKernel`);
they serve every other case and name the experts a row asks for that are not held here.

Rows are grouped by expert so each expert runs one matmul over all its rows. For a decode step's
handful of pairs the grouping is done in Python (a few dozen ints), which costs far less than the
dozen tensor ops a vectorised grouping needs; large batches (prefill) group with tensor ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.weights import LayerExperts

SMALL_PAIRS = 256  # at most this many (row, expert) pairs: group in Python


class UnknownExpertError(ValueError):
    """A row names an expert this process does not hold."""


def expert_forward(experts: LayerExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   count_into: list[int] | None = None) -> torch.Tensor:
    """x [T, H], ids [T, k] int (global ids, -1 = none), weights [T, k] -> [T, H] in x's dtype.

    `count_into` (indexed by global expert id) gets each expert's rows of this call added."""
    if experts.kernel is not None and x.dtype == torch.bfloat16:
        done = experts.kernel(x, ids, weights)
        if done is not None:
            out, counts = done
            if count_into is not None:
                for expert, count in zip(experts.expert_ids, counts, strict=True):
                    count_into[expert] += count
            return out
    group = _group_small if ids.numel() <= SMALL_PAIRS else _group_large
    rows, pair_w, counts = group(experts, ids, weights)  # pairs in expert order: row index, weight; pairs per expert
    if count_into is not None:
        for expert, count in zip(experts.expert_ids, counts, strict=True):
            count_into[expert] += count
    xs = x.index_select(0, rows)  # [pairs, H], grouped by expert
    ys = torch.empty(xs.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count:
            mine = slice(start, start + count)
            gate, up = experts.gate_up[e](xs[mine]).chunk(2, dim=-1)
            # scaled by the gate weights straight into ys (float32): no second pass over all pairs
            torch.mul(experts.down[e](F.silu(gate) * up), pair_w[mine, None], out=ys[mine])
            start += count
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, ys)
    return out.to(x.dtype)


def _unknown(experts: LayerExperts, ids: list[int]) -> UnknownExpertError:
    return UnknownExpertError(f"layer {experts.layer}: experts {sorted(set(ids))} are not held here "
                              f"(held: {experts.expert_ids})")


def _group_small(experts: LayerExperts, ids: torch.Tensor, weights: torch.Tensor):
    k = ids.shape[1]
    local_of = experts.local_list
    flat_ids, flat_w = ids.reshape(-1).tolist(), weights.reshape(-1)
    groups: list[list[int]] = [[] for _ in experts.expert_ids]  # pair positions per local expert
    missing = []
    for position, expert in enumerate(flat_ids):
        if expert < 0:
            continue
        if expert >= len(local_of) or local_of[expert] < 0:
            missing.append(expert)
            continue
        groups[local_of[expert]].append(position)
    if missing:
        raise _unknown(experts, missing)
    positions = [p for group in groups for p in group]
    index = torch.tensor(positions, dtype=torch.int64, device=ids.device)
    return (torch.div(index, k, rounding_mode="floor"), flat_w.index_select(0, index).float(),
            [len(group) for group in groups])


def _group_large(experts: LayerExperts, ids: torch.Tensor, weights: torch.Tensor):
    t, k = ids.shape
    flat_ids = ids.reshape(-1).long()
    used = flat_ids >= 0
    known = len(experts.local_of)
    local = torch.where(used & (flat_ids < known), experts.local_of[flat_ids.clamp(0, known - 1)],
                        torch.full_like(flat_ids, -1))
    missing = used & (local < 0)
    if bool(missing.any()):
        raise _unknown(experts, flat_ids[missing].tolist())
    rows = torch.arange(t, device=ids.device).repeat_interleave(k)[used]
    local, pair_w = local[used], weights.reshape(-1)[used]
    order = torch.argsort(local, stable=True)
    counts = torch.bincount(local, minlength=len(experts.expert_ids)).tolist()
    return rows[order], pair_w[order].float(), counts
