"""Running a request's choices (prompts × n) as concurrent router calls and merging their chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from gateway.errors import GatewayError, timed_out
from gateway.router_client import RouterPool
from moe_core.pb import router_pb2

QUEUE_CHUNKS_PER_CHOICE = 8  # bounded, so a slow HTTP client slows the router streams instead of piling up


@dataclass(frozen=True)
class ChoiceSpec:
    index: int  # OpenAI's choice index: prompt_i * n + j
    prompt_ids: list[int]
    sampling: router_pb2.SamplingParams


@dataclass(frozen=True)
class ChoiceEvent:
    index: int
    chunk: router_pb2.GenerateChunk


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[router_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, chunk: router_pb2.GenerateChunk) -> None:
        self.text.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        self.completion_tokens = max(self.completion_tokens, chunk.completion_tokens)
        if chunk.finished:
            self.finish_reason = chunk.finish_reason or "stop"


class _Finished:
    """Queue marker: one choice's stream ended normally."""


async def stream_choices(pool: RouterPool, specs: list[ChoiceSpec], request_id: str,
                         deadline: float) -> AsyncIterator[ChoiceEvent]:
    """Chunks of every choice as they arrive. The first failure ends the stream and cancels the others.

    Choice i's router request id is `{request_id}-{i}`; `request_id` itself goes along as `x-request-id`.
    Consume it inside `aclosing(...)`: closing the iteration cancels every router call still running.
    """
    queue: asyncio.Queue[ChoiceEvent | _Finished | Exception] = asyncio.Queue(
        maxsize=QUEUE_CHUNKS_PER_CHOICE * len(specs))

    async def pump(spec: ChoiceSpec, router: str | None) -> None:
        try:
            await _pump(pool, spec, request_id, deadline, queue, router)
            await queue.put(_Finished())
        except Exception as exc:  # handed to the consumer, which raises it; CancelledError stays ours
            await queue.put(exc)

    # A prompt's choices share a router, whose prefix cache then prefills the prompt once for all of them.
    routers: dict[tuple[int, ...], str] = {}
    tasks = []
    for spec in specs:
        prompt = tuple(spec.prompt_ids)
        if len(specs) > 1 and prompt not in routers:
            routers[prompt] = pool.choose(spec.prompt_ids)
        tasks.append(asyncio.create_task(pump(spec, routers.get(prompt))))
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if isinstance(item, _Finished):
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(pool: RouterPool, spec: ChoiceSpec, request_id: str, deadline: float,
                queue: asyncio.Queue, router: str | None) -> None:
    finished = False
    timeout_s = deadline - time.monotonic()
    if timeout_s <= 0:
        raise timed_out()
    chunks = pool.generate(spec.prompt_ids, spec.sampling, f"{request_id}-{spec.index}", timeout_s=timeout_s,
                           trace_id=request_id, prefer=router)
    async with aclosing(chunks):
        async for chunk in chunks:
            finished = chunk.finished
            await queue.put(ChoiceEvent(spec.index, chunk))
    if not finished:
        raise GatewayError(500, "The model server ended the generation without finishing it.")


async def collect(events: AsyncIterator[ChoiceEvent], states: dict[int, ChoiceState]) -> None:
    """Run a non-streaming request to the end, folding every chunk into its choice."""
    async for event in events:
        states[event.index].add(event.chunk)
