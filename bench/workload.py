"""Seeded benchmark workloads (DESIGN §8): mixed prompt and output lengths, as token ids."""

from __future__ import annotations

import math
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


def arrival_times(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Seconds from the start at which each of `n` requests of an open-loop level is sent.

    The gaps are gamma-distributed with mean 1/`rate` and shape `burstiness`: 1 is a Poisson process,
    below 1 burstier, above 1 more regular (as vLLM's benchmark_serving). The first request goes at 0;
    an infinite rate sends every request at once. Seeded apart from the prompts, so a level's requests
    and their times are the same in every run."""
    if not rate > 0 or burstiness <= 0:
        raise ValueError(f"an open-loop level needs a rate > 0 and burstiness > 0 (got {rate}, {burstiness})")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


@dataclass(frozen=True)
class Level:
    """One load level of a benchmark: a fixed number of requests in flight (closed loop: each reply lets
    the next request go), or requests sent at seeded arrival times whatever is in flight (open loop)."""

    concurrency: int | None = None
    rate: float | None = None  # requests per second

    @classmethod
    def of_run(cls, run: dict) -> Level:
        """The level a result of `moe-serve bench` was measured at."""
        rate = run.get("request_rate")  # "inf" for an infinite rate
        return cls(rate=float(rate)) if rate is not None else cls(concurrency=run["concurrency"])

    @property
    def label(self) -> str:
        return f"{self.rate:g} req/s" if self.rate is not None else str(self.concurrency)

    @property
    def short(self) -> str:
        """As in the ratio lines and progress bars: "c=32" or "4 req/s"."""
        return self.label if self.rate is not None else f"c={self.concurrency}"

    def sort_key(self) -> tuple[int, float]:
        return (1, self.rate) if self.rate is not None else (0, float(self.concurrency))
