"""The engine: requests in, one batched model step at a time, per-request token deltas out."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from moe_core.errors import CapacityError, MoeServeError, RequestError, UnavailableError
from moe_core.forward import ExpertCall, ExpertHandle, forward_overlapped, forward_step, layer_program
from moe_core.model import DenseModel
from moe_core.tokenizer import IncrementalDetokenizer, Tokenizer
from router_service.engine.batch import build_batch, split_step
from router_service.engine.drafts import RepeatDrafts
from router_service.engine.kv_cache import BlockAllocator, KvCache
from router_service.engine.params import SamplingParams
from router_service.engine.sampler import Sampler
from router_service.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from router_service.engine.sequence import Sequence, Status, TokenLogprob
from router_service.engine.stop import StopChecker
from router_service.expert_backend import ExpertBackend


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped by the cache
    seed: int | None = None  # of the engine's generator for unseeded requests
    overlap: bool = False  # with a remote expert backend, run two micro-batches so network time hides
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    draft_tokens: int = 0  # most draft tokens of a repeated request verified per step (engine/drafts.py); 0: off


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # "unavailable" (a needed service is down) or "internal"


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def on_step(self, engine: Engine, scheduled: ScheduledStep, outputs: list[RequestOutput]) -> None:
        """After a step ran and its tokens were appended (one output per sequence that sampled)."""

    def observe_queue(self, engine: Engine) -> None:
        """When the queue changed without a step (a request arrived)."""

    def on_finish(self, seq: Sequence, reason: str) -> None:
        """When a sequence ends: stop, length, abort or error."""


class Engine:
    def __init__(self, model: DenseModel, experts: ExpertBackend, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None, observer: EngineObserver | None = None):
        self.model, self.experts, self.tokenizer = model, experts, tokenizer
        self.observer = observer or EngineObserver()
        self.config = config = config or EngineConfig()
        cfg = model.cfg
        self.kv = KvCache.from_budget(cfg, config.kv_cache_bytes, config.block_size, model.dtype, str(model.device))
        self.allocator = BlockAllocator(self.kv.num_blocks, config.block_size, config.prefix_caching)
        self.drafts = RepeatDrafts(config.draft_tokens) if config.draft_tokens > 0 else None
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.block_size), self.allocator,
            self.drafts)
        self.sampler = Sampler(model.device, config.seed)
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, self.kv.capacity_tokens)
        self.eos_ids = frozenset(cfg.eos_token_ids) | frozenset(tokenizer.eos_token_ids if tokenizer else ())
        self.requests: dict[str, Sequence] = {}
        self.last_step_tokens = 0
        # where the last step's time went (EngineObserver.on_step reads them): its wall time, scheduling to
        # outputs, and the part spent in routed-expert calls (computed here, or sent to shards and awaited)
        self.last_step_seconds = 0.0
        self.last_step_expert_seconds = 0.0
        self._ids = itertools.count()
        self._step_ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raise RequestError (bad input) or CapacityError (can never fit)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id '{request_id}' is already running", "request_id")
        self._validate(prompt_ids, params)
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params,
                       eos_ids=frozenset() if params.ignore_eos else self.eos_ids,
                       arrival=time.monotonic(), stop=StopChecker(params.stop))
        if params.seed is not None:
            seq.generator = torch.Generator(self.model.device)
            seq.generator.manual_seed(params.seed)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.observer.observe_queue(self)
        return request_id

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model.cfg.vocab_size
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        params.validate(vocab)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need the model's tokenizer, which this server does not have", "stop")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise CapacityError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{total} ({len(prompt_ids)} in the prompt, {params.max_tokens} to generate)", "max_tokens")

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        self.observer.on_finish(seq, "abort")
        return self._final(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batched forward pass; return a delta for every request that produced a token.

        If the forward pass fails (an expert shard unreachable, say), every request in the step
        ends with finish_reason "error" and its resources are freed; the engine stays usable.
        """
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        self.last_step_tokens = scheduled.num_tokens
        if scheduled.empty:
            return []
        experts = _ExpertClock(self.experts)
        try:
            with torch.inference_mode():
                logits, to_sample = self._forward(scheduled, experts)
                generators = {seq: seq.generator.get_state() for seq in scheduled.drafts
                              if seq.generator is not None and not seq.params.greedy}  # greedy rows draw nothing
                tokens, logprobs = self.sampler(logits, to_sample)
        except Exception as exc:
            seqs = scheduled.decodes + [s for s, _ in scheduled.prefills]
            return [self._fail(seq, exc) for seq in seqs]
        for seq in scheduled.decodes:
            seq.num_cached += 1
        for seq, n in scheduled.prefills:
            seq.num_cached += n
        sampled: dict[Sequence, list[tuple[int, TokenLogprob | None]]] = {}
        for seq, token, lp in zip(to_sample, tokens, logprobs, strict=True):
            sampled.setdefault(seq, []).append((token, lp))  # a sequence's own row first, then its draft rows
        for seq, draft in scheduled.drafts.items():
            rows = sampled[seq]
            right = self.drafts.accept(seq, draft, [token for token, _ in rows])
            seq.num_cached += right  # the rows whose input was a right draft token hold the true keys and values
            del rows[right + 1:]
            if seq in generators and right < len(draft):
                _replay(seq.generator, generators[seq], right + 1)
        for seq in itertools.chain(scheduled.decodes, (s for s, _ in scheduled.prefills)):
            self.scheduler.record_computed(seq)
        outputs = [self._emit(seq, rows) for seq, rows in sampled.items()]
        self.last_step_seconds, self.last_step_expert_seconds = time.perf_counter() - started, experts.seconds
        self.observer.on_step(self, scheduled, outputs)
        return outputs

    def _forward(self, scheduled: ScheduledStep, experts: _ExpertClock) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits of the sequences to sample, in order; two overlapped micro-batches when that hides dispatch."""
        bs, device = self.kv.block_size, self.model.device
        parts = split_step(scheduled) if self.config.overlap and self.experts.overlaps else [scheduled]
        batches = [build_batch(part, bs, device) for part in parts]
        for batch, _ in batches:
            batch.step_id = next(self._step_ids)
            batch.invariant_prefill = "prefill" in self.experts.invariant_phases
            batch.invariant_decode = "decode" in self.experts.invariant_phases
        if len(batches) == 1:
            batch, to_sample = batches[0]
            return forward_step(self.model, self.kv.layers, bs, batch, experts), to_sample
        programs = [layer_program(self.model, self.kv.layers, bs, batch) for batch, _ in batches]
        logits = torch.cat(forward_overlapped(programs, experts.submit))
        return logits, [seq for _, to_sample in batches for seq in to_sample]

    def _emit(self, seq: Sequence, rows: list[tuple[int, TokenLogprob | None]]) -> RequestOutput:
        """Append a step's tokens for one sequence (several when a draft was right) as one output."""
        out = self._append(seq, *rows[0])
        for token, logprob in rows[1:]:
            if out.finished:
                break
            more = self._append(seq, token, logprob)
            out.token_ids += more.token_ids
            out.text += more.text
            if out.logprobs is not None and more.logprobs:
                out.logprobs += more.logprobs
            out.completion_tokens, out.finished, out.finish_reason = (more.completion_tokens, more.finished,
                                                                      more.finish_reason)
        return out

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        now = time.monotonic()
        seq.first_token_time = seq.first_token_time or now
        seq.output_ids.append(token)
        out = RequestOutput(seq.request_id, [token], logprobs=[logprob] if logprob else None,
                            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids))
        reason = None
        if token in seq.eos_ids or token in seq.params.stop_token_ids:
            reason = "stop"
        elif seq.detokenizer is not None:
            delta = "" if token in self.eos_ids else seq.detokenizer.push(token)
            out.text, hit = seq.stop.feed(delta)
            reason = "stop" if hit else None
        if reason is None and (len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if reason == "length" or token in seq.eos_ids or token in seq.params.stop_token_ids:
                out.text += self._drain_text(seq)
            self.requests.pop(seq.request_id, None)
            self.scheduler.finish(seq)
            self.observer.on_finish(seq, reason)
            out.finished, out.finish_reason = True, reason
        return out

    def _drain_text(self, seq: Sequence) -> str:
        """Text held back (incomplete UTF-8, a possible stop-string prefix) once the sequence ends."""
        if seq.detokenizer is None:
            return ""
        text, hit = seq.stop.feed(seq.detokenizer.flush())
        return text if hit else text + seq.stop.flush()

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        self.requests.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        self.observer.on_finish(seq, "error")
        out = self._final(seq, "error")
        out.error = str(exc) if isinstance(exc, MoeServeError) else f"{type(exc).__name__}: {exc}"
        out.error_code = "unavailable" if isinstance(exc, UnavailableError) else "internal"
        return out

    def _final(self, seq: Sequence, reason: str) -> RequestOutput:
        return RequestOutput(seq.request_id, finished=True, finish_reason=reason,
                             prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids))

    def status_of(self, request_id: str) -> Status | None:
        seq = self.requests.get(request_id)
        return seq.status if seq else None


class _ExpertClock:
    """The expert backend as one step sees it, adding up the time the engine's thread spends in its calls:
    the experts' compute in this process, or a dispatch to the shards and the wait for their answer."""

    __slots__ = ("experts", "seconds")

    def __init__(self, experts: ExpertBackend):
        self.experts, self.seconds = experts, 0.0

    def __call__(self, call: ExpertCall) -> torch.Tensor:
        started = _settled(call.x)
        try:
            return self.experts(call)
        finally:
            self.seconds += time.perf_counter() - started

    def submit(self, call: ExpertCall) -> _TimedHandle:
        started = _settled(call.x)
        try:
            return _TimedHandle(self.experts.submit(call), self)
        finally:
            self.seconds += time.perf_counter() - started


def _settled(x: torch.Tensor) -> float:
    """The time once the work queued before the experts is done. On a GPU the experts' first read of their
    routing waits for it (the attention before them, say), which would otherwise count as expert time; the
    experts wait for it anyway, so the clock's own wait costs one synchronisation."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


class _TimedHandle:
    __slots__ = ("clock", "handle")

    def __init__(self, handle: ExpertHandle, clock: _ExpertClock):
        self.handle, self.clock = handle, clock

    def result(self) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return self.handle.result()
        finally:
            self.clock.seconds += time.perf_counter() - started


def _replay(generator: torch.Generator, state: torch.Tensor, draws: int) -> None:
    """Put a request's generator where `draws` one-row samples leave it, as if no rejected draft row had drawn."""
    generator.set_state(state)
    for _ in range(draws):
        torch.rand(1, generator=generator, device=generator.device)
