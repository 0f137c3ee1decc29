"""From a validated request to what the router takes: prompt token ids and `SamplingParams` per choice.

Everything here is plain CPU work (tokenizing, rendering chat templates), run off the event loop by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import bad_request
from gateway.protocol import DEFAULT_COMPLETION_TOKENS, ChatCompletionRequest, CommonRequest, CompletionRequest
from moe_core.errors import TokenizerError
from moe_core.pb import router_pb2
from moe_core.tokenizer import Tokenizer

INT64 = 2**63


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # what `echo` shows: the prompt as the client wrote it (or the decoded ids)


@dataclass(frozen=True)
class ModelLimits:
    """What the served model accepts (the router's ModelInfo, the tokenizer), narrowed by the server's settings."""

    vocab_size: int
    max_model_len: int  # prompt plus output; 0 when the router does not say
    max_prompt_tokens: int = 0  # the server's limit on a prompt; 0: only the context bounds it
    max_tokens: int = 0  # the server's limit on max_tokens; 0: only the context bounds it

    @classmethod
    def of(cls, info: router_pb2.ModelInfo, tokenizer: Tokenizer, max_prompt_tokens: int = 0,
           max_tokens: int = 0) -> ModelLimits:
        # An id must both embed (the model's vocab) and detokenize (the tokenizer's).
        vocab = min(info.vocab_size, tokenizer.vocab_size) if info.vocab_size > 0 else tokenizer.vocab_size
        return cls(vocab, info.max_model_len, max_prompt_tokens, max_tokens)


def check_max_tokens(request: CompletionRequest | ChatCompletionRequest, limits: ModelLimits) -> None:
    """400 when the client asks for more output than this server allows."""
    if not limits.max_tokens:
        return
    given = [name for name in ("max_tokens", "max_completion_tokens")
             if getattr(request, name, None) is not None and name in request.model_fields_set]
    for name in given:
        if getattr(request, name) > limits.max_tokens:
            raise bad_request(f"{name} must be at most {limits.max_tokens} on this server", name)


def completion_max_tokens(request: CompletionRequest, limits: ModelLimits) -> int:
    """The client's max_tokens, else OpenAI's default of 16 within this server's limit."""
    if "max_tokens" in request.model_fields_set and request.max_tokens is not None:
        return request.max_tokens
    return min(DEFAULT_COMPLETION_TOKENS, limits.max_tokens or DEFAULT_COMPLETION_TOKENS)


def completion_prompts(request: CompletionRequest, tokenizer: Tokenizer, limits: ModelLimits) -> list[Prompt]:
    check_max_tokens(request, limits)
    max_tokens = completion_max_tokens(request, limits)
    prompts = []
    for item in request.prompt:
        if isinstance(item, str):
            prompt = Prompt(tokenizer.encode(item, add_special_tokens=True), item)
        else:
            check_vocab(item, limits, "prompt")
            prompt = Prompt(list(item), tokenizer.decode(item, skip_special_tokens=False) if request.echo else "")
        check_length(prompt.ids, max_tokens, limits, "prompt")
        prompts.append(prompt)
    return prompts


def chat_prompt(request: ChatCompletionRequest, tokenizer: Tokenizer, limits: ModelLimits) -> Prompt:
    if not tokenizer.has_chat_template:
        raise bad_request("This model has no chat template; use /v1/completions.", "messages")
    check_max_tokens(request, limits)
    messages = [message.as_template_input() for message in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except TokenizerError as exc:
        # The template's own words (e.g. "roles must alternate") are what the client needs; drop the path.
        raise bad_request(str(exc).split(": ", 1)[-1], "messages") from None
    prompt = Prompt(tokenizer.encode(text, add_special_tokens=False), text)
    check_length(prompt.ids, request.output_limit, limits, "messages")
    return prompt


def chat_max_tokens(request: ChatCompletionRequest, prompt: Prompt, limits: ModelLimits) -> int:
    """The client's limit, else whatever room the context leaves, within this server's limit."""
    if request.output_limit is not None:
        return request.output_limit
    room = limits.max_model_len - len(prompt.ids) if limits.max_model_len > 0 else DEFAULT_COMPLETION_TOKENS
    return min(room, limits.max_tokens) if limits.max_tokens else room


def check_vocab(ids: Sequence[int], limits: ModelLimits, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < limits.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of vocabulary (0..{limits.vocab_size - 1})", param)


def check_length(ids: Sequence[int], max_tokens: int | None, limits: ModelLimits, param: str) -> None:
    if not ids:
        raise bad_request("The prompt is empty after tokenization.", param)
    if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
        raise bad_request(f"The prompt has {len(ids)} tokens; this server accepts at most "
                          f"{limits.max_prompt_tokens}.", param)
    if limits.max_model_len <= 0:
        return
    if len(ids) >= limits.max_model_len:
        raise bad_request(f"The prompt has {len(ids)} tokens; this model's context is {limits.max_model_len} "
                          "tokens for prompt and output together.", param)
    if max_tokens is not None and len(ids) + max_tokens > limits.max_model_len:
        raise bad_request(f"The prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                          f"context of {limits.max_model_len} tokens.", "max_tokens")


def sampling_params(request: CommonRequest, limits: ModelLimits, *, max_tokens: int, logprobs: int | None,
                    choice: int) -> router_pb2.SamplingParams:
    """The router's sampling for choice `choice` (0-based within its prompt)."""
    stop_ids = request.stop_token_ids or []
    check_vocab(stop_ids, limits, "stop_token_ids")
    params = router_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=min(max(request.top_k or 0, 0), limits.vocab_size),  # k beyond the vocabulary keeps every token
        stop=request.stop_list,
        stop_token_ids=stop_ids,
        ignore_eos=bool(request.ignore_eos),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
    )
    if request.seed is not None:
        # seed+i: the choices differ yet each stays reproducible; wraps within int64 like the proto field.
        params.seed = (request.seed + choice + INT64) % (2 * INT64) - INT64
    if logprobs is not None:
        params.logprobs = logprobs
    return params
