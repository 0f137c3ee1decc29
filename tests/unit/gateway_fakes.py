"""A scripted in-process router and a harness serving the gateway against it, for the gateway tests.

The fake's Generate answers with tokens derived from the prompt (each prompt id shifted, cycling), one per
chunk, honouring max_tokens, stop strings, seeds and logprobs. Markers in the prompt text script the rest:
`#429`, `#503`, `#400`, `#500` fail before any chunk; `#hang` hangs before any chunk, `#hang1` after
one chunk; `#midfail` fails after two chunks; `#slow` waits SLOW_CHUNK_S before each chunk. Every request,
its metadata and every cancellation is recorded; `info_hangs` makes GetModelInfo hang.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvicorn

from gateway.app import create_app
from gateway.router_client import RouterPool
from gateway.server import GatewayServer, bind
from gateway.settings import GatewaySettings
from moe_core.pb import router_pb2, router_pb2_grpc
from moe_core.rpc import SERVER_ORIGIN
from moe_core.tokenizer import Tokenizer
from moe_serve.ports import free_port

SLOW_CHUNK_S = 0.1
FIRST_PLAIN_ID = 5  # the demo tokenizer's ids 0..4 are special tokens, which decode to nothing
REVISION = "rev-test-1"
CREATED = 1_700_000_000
ERRORS = {
    "#429": (grpc.StatusCode.RESOURCE_EXHAUSTED, "the router's queue is full"),
    "#503": (grpc.StatusCode.UNAVAILABLE, "shard 1 has no live replica"),
    "#400": (grpc.StatusCode.INVALID_ARGUMENT, "prompt is too long for the router"),
    "#500": (grpc.StatusCode.INTERNAL, "Traceback: secret internal detail"),
}


def fake_token(prompt_ids: list[int], i: int, shift: int, vocab: int) -> int:
    """The i-th output token for a prompt: its ids shifted by `shift`, cycling, never a special token."""
    source = prompt_ids[i % len(prompt_ids)]
    return FIRST_PLAIN_ID + (source + shift - FIRST_PLAIN_ID) % (vocab - FIRST_PLAIN_ID)


def fake_logprob(i: int) -> float:
    return -0.25 * (i + 1)  # exact in float32, so tests compare with ==


@dataclass
class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    tokenizer: Tokenizer
    max_model_len: int = 2048
    ready: bool = True
    info_hangs: bool = False
    requests: list[router_pb2.GenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)  # each Generate call's invocation metadata
    cancelled: list[str] = field(default_factory=list)  # request ids whose calls the client cancelled
    hanging: threading.Event = field(default_factory=threading.Event)  # set once a call hangs
    cancel_seen: threading.Event = field(default_factory=threading.Event)

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        self.requests.append(request)
        self.metadata.append({key: value for key, value in context.invocation_metadata() or ()})
        prompt = self.tokenizer.decode(request.prompt_ids, skip_special_tokens=False)
        for marker, (code, details) in ERRORS.items():
            if marker in prompt:
                await context.abort(code, details, trailing_metadata=SERVER_ORIGIN)
        if "#hang" in prompt and "#hang1" not in prompt:
            await self._hang(request)
        sampling = request.sampling
        shift = 1 + (sampling.seed % 7 if sampling.HasField("seed") else 0)
        text = ""
        for i in range(sampling.max_tokens):
            if "#slow" in prompt:
                await asyncio.sleep(SLOW_CHUNK_S)
            token = fake_token(list(request.prompt_ids), i, shift, self.tokenizer.vocab_size)
            piece = self.tokenizer.decode([token])
            cut = _first_stop(text + piece, list(sampling.stop))
            finished = cut is not None or i == sampling.max_tokens - 1
            new_text = piece if cut is None else (text + piece)[:cut][len(text):]
            text += new_text
            yield router_pb2.GenerateChunk(
                token_ids=[token], text=new_text, logprobs=self._logprobs(sampling, token, i), finished=finished,
                finish_reason=("stop" if cut is not None else "length") if finished else "",
                prompt_tokens=len(request.prompt_ids), completion_tokens=i + 1)
            if finished:
                return
            if "#hang1" in prompt:
                await self._hang(request)
            if "#midfail" in prompt and i == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "shard 0 went down", trailing_metadata=SERVER_ORIGIN)

    async def GetModelInfo(self, request: Any, context: Any) -> router_pb2.ModelInfo:
        if self.info_hangs:
            await asyncio.Event().wait()
        return router_pb2.ModelInfo(model_id="demo", model_revision=REVISION, model_type="mixtral",
                                    vocab_size=self.tokenizer.vocab_size, max_model_len=self.max_model_len,
                                    created=CREATED, experts_backend="grpc")

    async def GetClusterStatus(self, request: Any, context: Any) -> router_pb2.ClusterStatus:
        return router_pb2.ClusterStatus(ready=self.ready, reason="" if self.ready else "shard 1 has no live replica")

    async def GetExpertStats(self, request: Any, context: Any) -> router_pb2.ExpertStats:
        return router_pb2.ExpertStats(num_layers=2, num_experts=4, moe_layers=[0, 1], tokens=[3, 1, 0, 2, 1, 1, 1, 1],
                                      balancedness=[0.5, 1.0], window_steps=64)

    async def _hang(self, request: router_pb2.GenerateRequest) -> None:
        self.hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            self.cancel_seen.set()
            raise

    def _logprobs(self, sampling: router_pb2.SamplingParams, token: int, i: int) -> list[router_pb2.TokenLogprob]:
        if not sampling.HasField("logprobs"):
            return []
        top = [router_pb2.TopLogprob(token_id=token + k, logprob=fake_logprob(i) - k) for k in range(sampling.logprobs)]
        return [router_pb2.TokenLogprob(token_id=token, logprob=fake_logprob(i), top=top)]


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


class Harness:
    """A fake router and the gateway served by uvicorn, both on one event loop in a background thread."""

    def __init__(self, model_dir: Path, *, dead_routers_first: int = 0, **overrides: Any):
        self.model_dir = model_dir
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.fake = FakeRouter(self.tokenizer)
        self._dead = [f"127.0.0.1:{free_port()}" for _ in range(dead_routers_first)]
        self._overrides = overrides
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._listening = threading.Event()
        self.port = 0

    def __enter__(self) -> Harness:
        self._thread.start()
        self.run(self._start())
        if not self._listening.wait(10):
            raise RuntimeError("the gateway did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._grpc = grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(self.fake, self._grpc)
        router_port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        routers = [*self._dead, f"127.0.0.1:{router_port}"]
        self.settings = GatewaySettings(model=str(self.model_dir), router=routers, model_name="demo",
                                        **self._overrides)
        self.settings.validate()
        self.pool = RouterPool(routers)
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.app = create_app(self.settings, self.pool, self.tokenizer)
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", timeout_graceful_shutdown=1)
        self._server = GatewayServer(config, on_started=self._listening.set)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))

    async def _stop(self) -> None:
        self._server.should_exit = True
        await self._serving
        await self.pool.close()
        await self._grpc.stop(grace=None)
