"""Seeded benchmark workloads (DESIGN §8): mixed prompt and output lengths, as token ids."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int


def mixed_workload(n: int, vocab: int, seed: int = 0, prompt_range: tuple[int, int] = (32, 512),
                   output_range: tuple[int, int] = (16, 128), repeat_fraction: float = 0.0,
                   first_id: int = 5) -> list[Request]:
    """`n` requests; a `repeat_fraction` of them repeat an earlier request's prompt exactly."""
    rng = random.Random(seed)
    out: list[Request] = []
    for _ in range(n):
        if out and rng.random() < repeat_fraction:
            out.append(rng.choice(out))
            continue
        length = rng.randint(*prompt_range)
        out.append(Request([rng.randrange(first_id, vocab) for _ in range(length)], rng.randint(*output_range)))
    return out
