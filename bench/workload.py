"""Seeded benchmark workloads (DESIGN §8): mixed prompt and output lengths, as token ids."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    repeat: bool = False  # the same prompt and length as an earlier request of the workload


def mixed_workload(n: int, vocab: int, seed: int = 0, prompt_range: tuple[int, int] = (32, 512),
                   output_range: tuple[int, int] = (16, 128), repeat_fraction: float = 0.0,
                   first_id: int = 5) -> list[Request]:
    """`n` requests; round(n * repeat_fraction) of them (never the first) repeat an earlier request exactly.

    Which requests repeat, and what, comes from a generator of its own; with no repeats the workload is
    the one earlier results used."""
    rng = random.Random(seed)
    picker = random.Random(f"repeats-{seed}")
    repeats = round(n * repeat_fraction)
    if not 0 <= repeats <= max(0, n - 1):
        raise ValueError(f"repeat_fraction {repeat_fraction}: {repeats} of {n} requests cannot repeat earlier ones")
    repeating = set(picker.sample(range(1, n), repeats))
    out: list[Request] = []
    for i in range(n):
        if i:
            rng.random()  # drawn as before repeats were counted exactly: the same fresh prompts as then
        if i in repeating:
            earlier = picker.choice(out)
            out.append(Request(earlier.prompt_ids, earlier.max_tokens, repeat=True))
            continue
        length = rng.randint(*prompt_range)
        out.append(Request([rng.randrange(first_id, vocab) for _ in range(length)], rng.randint(*output_range)))
    return out
