"""The OpenAPI document at /openapi.json: every route with its real request body, responses and headers.

Bodies are parsed by hand (see app.py), so FastAPI cannot infer them; the schemas here come from the same
pydantic models that validate requests (`protocol.py`) and from models of the bodies `responses.py` builds.
A route with no entry in OPERATIONS still appears, with FastAPI's generic description (a test asks for one).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.auth import OPEN_PATHS
from gateway.protocol import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ExpertStats(BaseModel):
    object: Literal["expert_stats"]
    model: str
    num_layers: int
    num_experts: int
    moe_layers: list[int]
    tokens: list[list[int]]
    balancedness: dict[str, float]
    window_steps: int
    routers: int


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    running: int
    waiting: int


class NotReady(BaseModel):
    status: Literal["not_ready", "draining"]
    reason: str | None = None


ERROR_MEANINGS = {
    400: "Invalid request; `param` names the offending field",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "Request body too large",
    429: "Rate or concurrency limit reached, or the router's queue is full",
    503: "No router or no live replica for a shard",
    504: "The request ran past its deadline",
}
GENERATION_ERRORS = (400, 404, 413, 429, 503, 504)
# Before OpenAPI 3.2, the `schema` of an event stream describes one event.
SSE = {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
                  "description": "With `\"stream\": true`: one event per chunk, `data` holding its JSON, then "
                                 "`data: [DONE]`"}}

# (method, path template) -> request body model, OK responses (status -> (description, content)), error statuses
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/completions"): {
        "summary": "Create a completion", "body": CompletionRequest, "errors": GENERATION_ERRORS,
        "ok": {200: ("A completion, or a stream of chunks", {"application/json": CompletionResponse,
                                                             "text/event-stream": SSE})}},
    ("post", "/v1/chat/completions"): {
        "summary": "Create a chat completion", "body": ChatCompletionRequest, "errors": GENERATION_ERRORS,
        "ok": {200: ("A chat completion, or a stream of chunks", {"application/json": ChatCompletionResponse,
                                                                  "text/event-stream": SSE})}},
    ("get", "/v1/models"): {
        "summary": "List the served model", "errors": (429, 503, 504),
        "ok": {200: ("The served model", {"application/json": ModelList})}},
    ("get", "/v1/models/{model_id}"): {
        "summary": "Describe a model", "errors": (404, 429, 503, 504),
        "ok": {200: ("The model", {"application/json": ModelCard})}},
    ("get", "/v1/experts/stats"): {
        "summary": "Tokens routed per layer and expert, and balancedness", "errors": (429, 503, 504),
        "ok": {200: ("Expert statistics summed over routers", {"application/json": ExpertStats})}},
    ("get", "/healthz"): {"summary": "Liveness", "ok": {200: ("Alive", {"application/json": Health})}},
    ("get", "/readyz"): {
        "summary": "Readiness: a router answers and every shard has a live replica (503 while draining)",
        "ok": {200: ("Ready", {"application/json": Ready}), 503: ("Not ready", {"application/json": NotReady})}},
    ("get", "/metrics"): {
        "summary": "Prometheus metrics",
        "ok": {200: ("Prometheus text format", {"text/plain": {"schema": {"type": "string"}}})}},
}
MODELS: list[type[BaseModel]] = [ErrorResponse, CompletionResponse, ChatCompletionResponse, ModelList, ModelCard,
                                 ExpertStats, Health, Ready, NotReady]
REQUEST_ID = {"description": "The request's id: the client's `x-request-id` if it was safe, else a new one",
              "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}}
RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "string", "pattern": "^[0-9]+$"}}


def openapi_schema(app: FastAPI, auth: bool) -> dict[str, Any]:
    """The document, built once per app and cached (as FastAPI caches its own)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               description="OpenAI-compatible API of moe-serve")
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                describe(operation, OPERATIONS.get((method, path)), guarded=auth and path not in OPEN_PATHS)
        document["components"] = components()
        app.openapi_schema = document
    return app.openapi_schema


def describe(operation: dict[str, Any], spec: dict[str, Any] | None, guarded: bool) -> None:
    if spec is None:
        return
    operation["summary"] = spec["summary"]
    if "body" in spec:
        schema = {"$ref": REF.format(model=spec["body"].__name__)}
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    responses = {str(status): response(description, content) for status, (description, content) in
                 spec["ok"].items()}
    for status in (*spec.get("errors", ()), *((401,) if guarded else ())):
        responses[str(status)] = response(ERROR_MEANINGS[status], {"application/json": ErrorResponse})
        if status == 429:
            responses["429"]["headers"]["Retry-After"] = {**RETRY_AFTER, "required": True}
        elif status == 503:
            responses["503"]["headers"]["Retry-After"] = RETRY_AFTER
        elif status == 401:
            responses["401"]["headers"]["WWW-Authenticate"] = {"required": True, "schema": {"type": "string"}}
    operation["responses"] = dict(sorted(responses.items()))
    if guarded:
        operation["security"] = [{"bearerAuth": []}]


def response(description: str, content: dict[str, Any]) -> dict[str, Any]:
    media = {kind: {"schema": {"$ref": REF.format(model=body.__name__)}} if isinstance(body, type) else body
             for kind, body in content.items()}
    return {"description": description, "headers": {"x-request-id": dict(REQUEST_ID)}, "content": media}


def components() -> dict[str, Any]:
    models = [(model, "validation") for model in (CompletionRequest, ChatCompletionRequest)]
    models += [(model, "serialization") for model in MODELS]
    _, definitions = models_json_schema(models, ref_template=REF)
    return {"schemas": definitions["$defs"],
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "Authorization: Bearer API_KEY"}}}
