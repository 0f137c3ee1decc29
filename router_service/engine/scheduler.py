"""Continuous batching: which sequences run in the next step and how many of their tokens.

Every step first gives each running sequence its next tokens (one for a decode, a chunk for a
prompt still being prefilled), oldest first, then admits waiting requests first-come-first-served
while the token budget, the sequence limit and free KV blocks allow. When the KV cache is full,
the newest running sequence is preempted (its blocks freed, recomputed later from its tokens), so
older requests always make progress and nothing is lost. With prefix caching, a sequence being
admitted first takes the cached blocks of its longest known prefix and prefills only the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from router_service.engine.kv_cache import BlockAllocator
from router_service.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16


@dataclass
class ScheduledStep:
    decodes: list[Sequence] = field(default_factory=list)  # one token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_query_tokens = self.prefix_hit_tokens = 0  # prompt tokens looked up / found in the cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.num_pending, budget)
            if self._reserve_or_preempt(seq, seq.num_cached + n):
                self._place(step, seq, n)
                budget -= n
        if self.num_preemptions == preemptions_before:  # admitting now would only thrash the cache
            self._admit(step, budget)
        return step

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self._reuse_prefix(seq)
            n = min(seq.num_pending, budget)
            need = self.blocks_for(seq.num_cached + n) - len(seq.blocks)
            if need > self.allocator.num_free:
                self.allocator.free(seq.blocks)  # don't pin cached blocks while waiting
                seq.reset_for_recompute()
                break
            self.prefix_query_tokens += seq.num_tokens - 1
            self.prefix_hit_tokens += seq.num_cached
            seq.blocks += self.allocator.allocate(need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._place(step, seq, n)
            budget -= n

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start `seq` on the cached blocks of its prompt's longest known prefix (all but the last
        token at most: that one's logits are needed)."""
        if not self.allocator.prefix_caching:
            return
        blocks, serial = self.allocator.match(seq.token_ids, seq.num_tokens - 1)
        seq.blocks, seq.prefix_serial = blocks, serial
        seq.num_hashed_blocks = len(blocks)
        seq.num_cached = len(blocks) * self.config.block_size

    def record_computed(self, seq: Sequence) -> None:
        """After a step: offer the blocks `seq` has just filled to the prefix cache."""
        bs = self.config.block_size
        full = seq.num_cached // bs
        if not self.allocator.prefix_caching or seq.num_hashed_blocks >= full:
            return
        ids = seq.token_ids
        for i in range(seq.num_hashed_blocks, full):
            seq.prefix_serial = self.allocator.register(seq.blocks[i], seq.prefix_serial, ids[i * bs:(i + 1) * bs])
        seq.num_hashed_blocks = full

    def _place(self, step: ScheduledStep, seq: Sequence, n: int) -> None:
        # A prompt's last token stays a (one-row) prefill when the rest came from the prefix cache,
        # so its result is the same as when the whole prompt was prefilled.
        if seq.in_decode:
            step.decodes.append(seq)
        else:
            step.prefills.append((seq, n))

    def _reserve_or_preempt(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens`, preempting newer sequences; False if `seq` itself had to go."""
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        while need > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.blocks += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that finished or was aborted, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.status = Status.FINISHED
