"""OpenAI request bodies for /v1/completions and /v1/chat/completions (pydantic v2).

Pydantic checks types and ranges; each request's `check(limits)` then applies the rules that span fields or
depend on the server's limits, raising `GatewayError` with the offending parameter. Unknown fields are
ignored: OpenAI clients send new ones before servers know them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError, WithJsonSchema

from gateway.errors import GatewayError, bad_request

INT64 = 2**63
INT32_MAX = 2**31 - 1  # the router's token counts are int32
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
R = TypeVar("R", bound="CommonRequest")
TOOLS_FIELDS = ("tools", "tool_choice", "functions", "function_call")

# What clients may send, for the OpenAPI schema: the validators below accept more shapes than they produce.
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    _TOKENS,
    {"type": "array", "items": _TOKENS, "minItems": 1},
], "description": "Text, several texts, token ids, or several lists of token ids"}
CONTENT_SCHEMA = {"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
    {"type": "null"},
], "description": "Text, or a list of text parts (joined by newlines)"}


@dataclass(frozen=True)
class RequestLimits:
    max_n: int
    max_stop_sequences: int
    max_choices: int  # prompts × n: each is a router call


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalize_prompt(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts, each text or token ids."""
    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(_is_token(v) for v in value):
        prompts = [list(value)]
    elif isinstance(value, list) and value and all(isinstance(v, list) and all(map(_is_token, v)) for v in value):
        prompts = [list(v) for v in value]
    else:
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of "
                         "lists of token ids")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt must not be empty")
    return prompts


def _normalize_content(value: Any) -> str | None:
    """Message content as text: a string, or a list of text parts joined by newlines."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("content must be a string or a list of content parts")
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"content parts of type {kind!r} are not supported; only 'text' parts are")
        texts.append(part["text"])
    return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class CommonRequest(BaseModel):
    """Fields both endpoints share; None means "not given", so defaults live in one place (prompts.py)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: StrictInt | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # -1 (vLLM's "off") is accepted as 0
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    user: str | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool | None = False
    logit_bias: dict[str, float] | None = None

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check(self, limits: RequestLimits) -> None:
        if self.choices_per_prompt > limits.max_n:
            raise bad_request(f"n must be at most {limits.max_n}", "n")
        stops = self.stop_list
        if len(stops) > limits.max_stop_sequences:
            raise bad_request(f"at most {limits.max_stop_sequences} stop sequences are allowed", "stop")
        if any(s == "" for s in stops):
            raise bad_request("stop sequences must not be empty", "stop")
        if any(i < 0 for i in self.stop_token_ids or []):
            raise bad_request("stop_token_ids must not be negative", "stop_token_ids")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")


class CompletionRequest(CommonRequest):
    prompt: Annotated[list[str | list[StrictInt]], BeforeValidator(_normalize_prompt), WithJsonSchema(PROMPT_SCHEMA)]
    max_tokens: StrictInt | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    @property
    def output_limit(self) -> int:
        return self.max_tokens or DEFAULT_COMPLETION_TOKENS

    def check(self, limits: RequestLimits) -> None:
        super().check(limits)
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise bad_request("best_of is not supported by this server (it must equal n)", "best_of")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", "echo")
        if len(self.prompt) * self.choices_per_prompt > limits.max_choices:
            raise bad_request(f"{len(self.prompt)} prompts × n={self.choices_per_prompt} exceeds the limit of "
                              f"{limits.max_choices} completions per request", "prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | None, BeforeValidator(_normalize_content), WithJsonSchema(CONTENT_SCHEMA)] = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None

    def as_template_input(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system role; chat templates only know "system".
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": self.content, "name": self.name, "tool_call_id": self.tool_call_id}
        return {k: v for k, v in message.items() if v is not None}


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check(self, limits: RequestLimits) -> None:
        super().check(limits)
        for name in TOOLS_FIELDS:
            # Empty lists and "none" ask for nothing, and some clients always send them.
            if getattr(self, name) not in (None, [], "none"):
                raise bad_request("tools are not supported by this server", name)
        for i, message in enumerate(self.messages):
            if message.tool_calls:
                raise bad_request("tools are not supported by this server", f"messages[{i}].tool_calls")
            if message.content is None and message.role != "assistant":
                raise bad_request(f"a {message.role} message needs content", f"messages[{i}].content")
        if self.response_format not in (None, {"type": "text"}):
            raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


def parse_request(cls: type[R], body: Any, limits: RequestLimits) -> R:
    """The validated request, or a 400 naming the first offending field."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        request = cls.model_validate(body)
    except ValidationError as exc:
        raise _from_validation(exc) from None
    request.check(limits)
    return request


def _from_validation(exc: ValidationError) -> GatewayError:
    # A union reports one error per member; the deepest one points at the actual bad value.
    error = max(exc.errors(include_url=False), key=lambda e: len(_param_path(e["loc"]) or ""))
    param = _param_path(error["loc"])
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return bad_request(f"{param}: {message}" if param else message, param)


def _param_path(loc: tuple[int | str, ...]) -> str | None:
    """`messages[0].content` from pydantic's loc, leaving out the union-member tags it inserts."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in ("str", "int", "float", "bool", "list", "dict"):
            path += f".{part}" if path else part
    return path or None
