"""Repeat drafts: an earlier output of the same prompt, verified as extra decode rows of one step.

A request that repeats an earlier one (the same prompt, greedy or with the same seed and sampling)
is proposed that request's output as a draft. The scheduler adds up to `tokens_per_step` draft
tokens after the sequence's own row; they run as ordinary decode rows at the next positions (the
paged decode kernel reads each row's own context, so a row computes what one decode step would),
and the engine keeps the sampled tokens up to the first one that differs from the draft. So the
output is the one decoding token by token gives, and a repeat finishes in a few steps. The draft
rows' inputs equal the earlier request's, so with the expert-output cache on they hit it and never
reach the experts.

A draft is a proposal only: a wrong one costs rows, never a wrong token. Requests whose next token
depends on more than their prompt and seed (unseeded sampling, penalties) are not drafted.
"""

from __future__ import annotations

from collections import OrderedDict

from router_service.engine.sequence import Sequence

MAX_PROMPTS = 1024  # earlier outputs remembered (least recently used go first)


def draft_key(seq: Sequence) -> tuple | None:
    """What decides a sequence's tokens besides the model: its prompt and sampling; None: not drafted."""
    p = seq.params
    if p.penalized or (not p.greedy and p.seed is None):
        return None
    sampling = ("greedy",) if p.greedy else (p.temperature, p.top_p, max(p.top_k, 0), p.seed)
    return tuple(seq.prompt_ids), sampling


class RepeatDrafts:
    def __init__(self, tokens_per_step: int, max_prompts: int = MAX_PROMPTS):
        self.tokens_per_step = tokens_per_step
        self.max_prompts = max_prompts
        # key -> the output list of the sequence that produced it (live: it grows while that one runs)
        self._outputs: OrderedDict[tuple, list[int]] = OrderedDict()
        self.proposed = self.accepted = 0  # draft tokens run / kept

    def attach(self, seq: Sequence) -> None:
        """On a new sequence's admission: give it an earlier output of its prompt, or remember its own."""
        key = draft_key(seq)
        if key is None:
            return
        seq.draft_key = key
        earlier = self._outputs.get(key)
        if earlier is None:
            self._outputs[key] = seq.output_ids
            if len(self._outputs) > self.max_prompts:
                self._outputs.popitem(last=False)
        elif earlier is not seq.output_ids:
            seq.draft = earlier
            self._outputs.move_to_end(key)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to `limit` tokens that follow the sequence's next one, if its output still follows the draft."""
        draft, m = seq.draft, len(seq.output_ids)
        if draft is None or limit <= 0:
            return []
        if m and (len(draft) < m or draft[m - 1] != seq.output_ids[-1]):
            seq.draft = None  # the two have parted (the earlier one's later tokens are of another path)
            return []
        return draft[m:m + min(limit, self.tokens_per_step)]

    def accept(self, seq: Sequence, draft: list[int], sampled: list[int]) -> int:
        """`sampled[j]` came from the row whose input was the draft's token j - 1 (row 0: the sequence's own
        row); return how many draft tokens were right, so their rows' results stand."""
        right = 0
        while right < len(draft) and sampled[right] == draft[right]:
            right += 1
        if right < len(draft):
            seq.draft = None
        self.proposed += len(draft)
        self.accepted += right
        return right

    def finished(self, seq: Sequence) -> None:
        """Keep the longest output seen for the prompt (an aborted or shorter request may have come first)."""
        if seq.draft_key is None:
            return
        kept = self._outputs.get(seq.draft_key)
        if kept is not None and kept is not seq.output_ids and len(kept) < len(seq.output_ids):
            self._outputs[seq.draft_key] = seq.output_ids
