"""Turning a scheduled step into the flat tensors `forward_step` takes."""

from __future__ import annotations

import torch

from moe_core.forward import PrefillChunk, StepBatch
from router_service.engine.scheduler import ScheduledStep
from router_service.engine.sequence import Sequence


def build_batch(step: ScheduledStep, block_size: int, device: torch.device
                ) -> tuple[StepBatch, list[Sequence]]:
    """Decode rows first, then prefill chunks; also return the sequences to sample, in logit-row order: each
    sequence's own row first, draft rows last (a sequence with a draft appears once per draft token more)."""
    tokens: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    sample: list[Sequence] = []
    logit_rows: list[int] = []

    batch = StepBatch(token_ids=torch.empty(0), positions=torch.empty(0), slots=torch.empty(0))
    # decode rows: each decoding sequence's next token, then the draft tokens that follow a sequence's
    # own last row (at the positions after it; the engine keeps their results only where the draft was right)
    decoding = step.decodes + [seq for seq, draft in step.drafts.items() for _ in draft]
    if decoding:
        decode_tokens = [s.token_ids[s.num_cached] for s in step.decodes]
        decode_pos = [s.num_cached for s in step.decodes]
        for seq, draft in step.drafts.items():
            decode_tokens += draft
            decode_pos += range(seq.num_tokens, seq.num_tokens + len(draft))
        pos = torch.tensor(decode_pos)
        width = max(len(s.blocks) for s in decoding)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in decoding])
        tokens += decode_tokens
        positions.append(pos)
        slots.append(tables.gather(1, (pos // block_size)[:, None])[:, 0] * block_size + pos % block_size)
        batch.num_decode = len(decoding)
        batch.block_tables = tables.to(device)
        batch.decode_lengths = [p + 1 for p in decode_pos]
        sample += step.decodes
        logit_rows += range(len(step.decodes))

    for seq, n in step.prefills:
        start, row = seq.num_cached, len(tokens)
        table = torch.tensor(seq.blocks)
        context = torch.arange(start + n)
        context_slots = table[context // block_size] * block_size + context % block_size
        tokens += seq.token_ids[start:start + n]
        positions.append(context[start:])
        slots.append(context_slots[start:])
        batch.prefills.append(PrefillChunk(row=row, length=n, start=start,
                                           context_slots=context_slots.to(device) if start else None))
        if start + n == seq.num_tokens:
            sample.append(seq)
            logit_rows.append(row + n - 1)

    sample += decoding[len(step.decodes):]  # the draft rows' sequences, in row order
    logit_rows += range(len(step.decodes), len(decoding))
    batch.token_ids = torch.tensor(tokens, device=device)
    batch.positions = torch.cat(positions).to(device)
    batch.slots = torch.cat(slots).to(device)
    batch.logit_rows = torch.tensor(logit_rows, dtype=torch.int64, device=device)
    batch.request_ids = [s.request_id for s in step.decodes] + [s.request_id for s, _ in step.prefills]
    return batch, sample


def split_step(step: ScheduledStep) -> list[ScheduledStep]:
    """Two micro-batches of about equal tokens (decodes halved, prefill chunks to the lighter side; a
    sequence's draft goes with it).

    A step with one sequence stays whole: there is nothing to overlap it with.
    """
    if len(step.decodes) + len(step.prefills) < 2:
        return [step]
    halves = [ScheduledStep(), ScheduledStep()]
    middle = (len(step.decodes) + 1) // 2
    halves[0].decodes, halves[1].decodes = step.decodes[:middle], step.decodes[middle:]
    for seq, n in sorted(step.prefills, key=lambda p: -p[1]):
        min(halves, key=lambda h: h.num_tokens).prefills.append((seq, n))
    for seq, draft in step.drafts.items():
        half = halves[0] if seq in halves[0].decodes or any(s is seq for s, _ in halves[0].prefills) else halves[1]
        half.drafts[seq] = draft
    return [h for h in halves if not h.empty]
