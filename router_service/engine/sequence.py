"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from moe_core.tokenizer import IncrementalDetokenizer
from router_service.engine.params import SamplingParams
from router_service.engine.stop import StopChecker


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens, best first


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    arrival: float
    stop: StopChecker
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # KV-cache blocks, in position order
    num_cached: int = 0  # leading tokens whose keys and values are in the cache
    num_hashed_blocks: int = 0  # leading full blocks known to the prefix cache
    prefix_serial: int = 0  # the prefix cache's serial of the last of them (0: none)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    detokenizer: IncrementalDetokenizer | None = None  # text for stop strings and streaming
    draft: list[int] | None = None  # an earlier output of the same prompt and sampling (engine/drafts.py)
    draft_key: tuple | None = None  # the prompt and sampling that decide the tokens, when drafting applies
    # while waiting: the running sequence whose prefill it waits for, and the blocks they share (scheduler.py)
    prefix_wait: tuple[Sequence, int] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_decode(self) -> bool:
        """The prompt is in the cache and exactly one token waits: the next step samples from one row."""
        return self.num_cached >= len(self.prompt_ids) and self.num_pending == 1

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next one can be sampled."""
        return self.num_tokens - self.num_cached

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, prompt and outputs so far are prefilled again."""
        self.blocks = []
        self.num_cached = self.num_hashed_blocks = self.prefix_serial = 0
        self.status = Status.WAITING
