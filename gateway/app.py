"""The gateway's FastAPI app: OpenAI's completions, chat, models, and health endpoints over a RouterPool.

Bodies are read and validated by hand rather than through FastAPI's body parameters, so that size limits,
malformed JSON and validation failures all answer in OpenAI's error shape with status 400/413, never 422
(`openapi.py` describes the bodies all the same). Around the routes, outermost first: the request's id,
deadline and access log (`access.py`), metrics, then API keys and per-client limits (`auth.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from gateway.access import RequestContext, new_request_id
from gateway.auth import AccessControl, ApiKeys
from gateway.errors import GatewayError, internal_error, model_not_found, retry_after, timed_out
from gateway.generation import ChoiceEvent, ChoiceSpec, ChoiceState, collect, stream_choices
from gateway.http_io import (
    SSE_DONE,
    ClientDisconnected,
    EventStream,
    mark_disconnected,
    read_json,
    sse,
    unless_disconnected,
)
from gateway.limits import ClientLimits
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.openapi import openapi_schema
from gateway.prompts import (
    ModelLimits,
    Prompt,
    chat_max_tokens,
    chat_prompt,
    completion_max_tokens,
    completion_prompts,
    sampling_params,
)
from gateway.protocol import ChatCompletionRequest, CompletionRequest, RequestLimits, parse_request
from gateway.responses import ChatFormat, CompletionFormat, ResponseFormat, new_id, usage
from gateway.router_client import RouterPool
from gateway.settings import GatewaySettings
from moe_core.pb import router_pb2
from moe_core.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Gateway:
    """The endpoints' shared state and handlers."""

    def __init__(self, settings: GatewaySettings, pool: RouterPool, tokenizer: Tokenizer):
        self.settings = settings
        self.pool = pool
        self.tokenizer = tokenizer
        self.model_name = settings.model_name or ""
        self.limits = RequestLimits(settings.max_n, settings.max_stop_sequences, settings.max_choices)
        self.draining = False  # set on SIGTERM: /readyz answers 503 so that load balancers move away

    async def completions(self, request: Request) -> Response:
        request_id, deadline = self._context(request)
        async with within(deadline):
            body = await read_json(request, self.settings.max_body_bytes)
            req = parse_request(CompletionRequest, body, self.limits)
            self._log_prompt(request_id, req.prompt)
            info, limits = await self._model(req.model)
            prompts = await asyncio.to_thread(completion_prompts, req, self.tokenizer, limits)
            n, max_tokens = req.choices_per_prompt, completion_max_tokens(req, limits)
            specs = [ChoiceSpec(i * n + j, prompt.ids, sampling_params(req, limits, max_tokens=max_tokens,
                                                                       logprobs=req.logprobs, choice=j))
                     for i, prompt in enumerate(prompts) for j in range(n)]
            echo = {spec.index: prompts[spec.index // n].text for spec in specs} if req.echo else {}
            fmt = CompletionFormat(new_id("cmpl"), self.model_name, info.model_revision, self.tokenizer,
                                   include_usage=req.include_usage, logprobs=req.logprobs, echo=echo)
            return await self._respond(request, bool(req.stream), specs, fmt, prompts, request_id, deadline)

    async def chat(self, request: Request) -> Response:
        request_id, deadline = self._context(request)
        async with within(deadline):
            body = await read_json(request, self.settings.max_body_bytes)
            req = parse_request(ChatCompletionRequest, body, self.limits)
            self._log_prompt(request_id, [message.as_template_input() for message in req.messages])
            info, limits = await self._model(req.model)
            prompt = await asyncio.to_thread(chat_prompt, req, self.tokenizer, limits)
            top = (req.top_logprobs or 0) if req.logprobs else None
            max_tokens = chat_max_tokens(req, prompt, limits)
            specs = [ChoiceSpec(j, prompt.ids, sampling_params(req, limits, max_tokens=max_tokens, logprobs=top,
                                                               choice=j))
                     for j in range(req.choices_per_prompt)]
            fmt = ChatFormat(new_id("chatcmpl"), self.model_name, info.model_revision, self.tokenizer,
                             include_usage=req.include_usage, logprobs=bool(req.logprobs), top_logprobs=top or 0)
            return await self._respond(request, bool(req.stream), specs, fmt, [prompt], request_id, deadline)

    async def models(self, request: Request) -> dict[str, Any]:
        async with within(self._context(request)[1]):
            return {"object": "list", "data": [await self._model_card()]}

    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        if model_id != self.model_name:
            raise model_not_found(model_id)
        async with within(self._context(request)[1]):
            return await self._model_card()

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        status = await self.pool.cluster_status()
        if status.ready:
            return JSONResponse({"status": "ready", "running": status.running, "waiting": status.waiting})
        return JSONResponse({"status": "not_ready", "reason": status.reason}, status_code=503)

    async def expert_stats(self) -> dict[str, Any]:
        """Tokens routed per [layer][expert] (summed over routers) and balancedness per MoE layer."""
        stats = await self.pool.expert_stats()
        if not stats:
            raise GatewayError(503, "No router answered.", code="service_unavailable", headers=retry_after(1))
        first = stats[0]
        width = first.num_experts
        tokens = [[sum(s.tokens[layer * width + e] for s in stats) for e in range(width)]
                  for layer in range(first.num_layers)]
        balance = {str(layer): sum(s.balancedness[i] for s in stats) / len(stats)
                   for i, layer in enumerate(first.moe_layers)}
        return {"object": "expert_stats", "model": self.model_name, "num_layers": first.num_layers,
                "num_experts": width, "moe_layers": list(first.moe_layers), "tokens": tokens,
                "balancedness": balance, "window_steps": first.window_steps, "routers": len(stats)}

    def _context(self, request: Request) -> tuple[str, float]:
        """The request's id and deadline, as RequestContext set them."""
        state = request.scope.get("state", {})
        return (state.get("request_id") or new_request_id(),
                state.get("deadline") or time.monotonic() + self.settings.request_timeout_s)

    def _log_prompt(self, request_id: str, prompt: Any) -> None:
        if self.settings.log_prompts:
            log.debug("request_id=%s prompt: %s", request_id, json.dumps(prompt, ensure_ascii=False))

    async def _model(self, name: str) -> tuple[router_pb2.ModelInfo, ModelLimits]:
        if name != self.model_name:
            raise model_not_found(name)
        info = await self.pool.model_info()
        return info, ModelLimits.of(info, self.tokenizer, self.settings.max_prompt_tokens,
                                    self.settings.max_tokens_limit)

    async def _model_card(self) -> dict[str, Any]:
        info = await self.pool.model_info()
        return {"id": self.model_name, "object": "model", "created": info.created, "owned_by": "moe-serve",
                "max_model_len": info.max_model_len}

    async def _respond(self, request: Request, stream: bool, specs: list[ChoiceSpec], fmt: ResponseFormat,
                       prompts: list[Prompt], request_id: str, deadline: float) -> Response:
        states = {spec.index: ChoiceState(spec.index) for spec in specs}
        prompt_tokens = sum(len(prompt.ids) for prompt in prompts)  # once per prompt, however many choices
        events = stream_choices(self.pool, specs, request_id, deadline)
        if not stream:
            async with aclosing(events):
                await unless_disconnected(request, collect(events, states))
            totals = usage(prompt_tokens, sum(state.completion_tokens for state in states.values()))
            return JSONResponse(fmt.response([states[i] for i in sorted(states)], totals))
        try:
            # Wait for the first chunk before answering, so that an early failure (queue full, shard down,
            # bad prompt) still gets its HTTP status instead of a 200 stream holding an error.
            first = await unless_disconnected(request, anext(events))
        except BaseException:
            await events.aclose()
            raise
        return EventStream(_sse_body(fmt, events, first, states, prompt_tokens))


async def _sse_body(fmt: ResponseFormat, events: AsyncGenerator[ChoiceEvent, None], first: ChoiceEvent,
                    states: dict[int, ChoiceState], prompt_tokens: int) -> AsyncGenerator[bytes, None]:
    try:
        for index in sorted(states):
            opening = fmt.start(index)
            if opening is not None:
                yield sse(opening)
        event: ChoiceEvent | None = first
        while event is not None:
            for body in _event_bodies(fmt, event, states[event.index]):
                yield sse(body)
            event = await anext(events, None)
        if fmt.include_usage:
            totals = usage(prompt_tokens, sum(state.completion_tokens for state in states.values()))
            yield sse(fmt.usage_chunk(totals))
    except GatewayError as exc:  # headers are sent: the error travels as an event, as OpenAI's servers do
        yield sse(exc.body())
    except Exception:
        log.exception("stream failed")
        yield sse(internal_error().body())
    finally:
        await events.aclose()
    yield SSE_DONE


def _event_bodies(fmt: ResponseFormat, event: ChoiceEvent, state: ChoiceState) -> list[dict[str, Any]]:
    state.add(event.chunk)
    bodies = []
    delta = fmt.delta(event.index, event.chunk)
    if delta is not None:
        bodies.append(delta)
    if event.chunk.finished:
        bodies.append(fmt.finish(state))
    return bodies


@asynccontextmanager
async def within(deadline: float) -> AsyncIterator[None]:
    """Bound what runs inside by the request's deadline: 504 when it passes."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            yield
    except TimeoutError:
        raise timed_out() from None


def create_app(settings: GatewaySettings, pool: RouterPool, tokenizer: Tokenizer) -> FastAPI:
    gateway = Gateway(settings, pool, tokenizer)
    keys = ApiKeys(settings.configured_keys())
    app = FastAPI(title="moe-serve gateway", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.gateway = gateway
    app.add_api_route("/v1/completions", gateway.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", gateway.chat, methods=["POST"])
    app.add_api_route("/v1/models", gateway.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", gateway.model, methods=["GET"])
    app.add_api_route("/v1/experts/stats", gateway.expert_stats, methods=["GET"])
    app.add_api_route("/healthz", gateway.healthz, methods=["GET"])
    app.add_api_route("/readyz", gateway.readyz, methods=["GET"])
    metrics = GatewayMetrics()
    app.add_api_route("/metrics", metrics.endpoint, methods=["GET"])
    app.openapi = lambda: openapi_schema(app, auth=keys.enabled)  # type: ignore[method-assign]
    # Added innermost first: each add_middleware wraps everything added before it.
    app.add_middleware(AccessControl, keys=keys,
                       limits=ClientLimits(settings.rate_limit_rpm, settings.max_streams_per_key))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestContext, timeout_s=settings.request_timeout_s, draining=lambda: gateway.draining)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    return app


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return GatewayError(exc.status_code, str(exc.detail), headers=exc.headers).response()


async def _client_gone(request: Request, exc: Exception) -> Response:
    mark_disconnected(request.scope)
    return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it
