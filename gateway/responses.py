"""OpenAI response bodies and stream chunks for completions and chat, built from router chunks.

A format object holds what every body of one response shares (id, created, model, fingerprint) and turns
router output into OpenAI's shapes: `start`/`delta`/`finish`/`usage_chunk` for streams, `response` otherwise.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gateway.generation import ChoiceState
from moe_core.pb import router_pb2
from moe_core.tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseFormat:
    """Shared envelope of one response and its stream chunks."""

    object = ""
    chunk_object = ""

    def __init__(self, response_id: str, model: str, fingerprint: str, tokenizer: Tokenizer,
                 include_usage: bool = False):
        self.id = response_id
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer
        self.include_usage = include_usage

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = self.envelope(self.chunk_object, [choice])
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
        return body

    def usage_chunk(self, totals: dict[str, int]) -> dict[str, Any]:
        return {**self.envelope(self.chunk_object, []), "usage": totals}

    def response(self, states: list[ChoiceState], totals: dict[str, int]) -> dict[str, Any]:
        return {**self.envelope(self.object, [self.choice(state) for state in states]), "usage": totals}

    def start(self, index: int) -> dict[str, Any] | None:
        """The stream chunk that opens a choice, if any."""
        raise NotImplementedError

    def delta(self, index: int, chunk: router_pb2.GenerateChunk) -> dict[str, Any] | None:
        """The stream chunk for new output, or None when there is nothing to show yet."""
        raise NotImplementedError

    def finish(self, state: ChoiceState) -> dict[str, Any]:
        """The stream chunk that closes a choice with its finish reason."""
        raise NotImplementedError

    def choice(self, state: ChoiceState) -> dict[str, Any]:
        """One finished choice of a non-streaming response."""
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args: Any, logprobs: int | None, echo: dict[int, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.logprobs = logprobs
        self.echo = echo  # choice index -> prompt text to put in front
        self.offsets: dict[int, int] = {}  # choice index -> text_offset of its next token

    def start(self, index: int) -> dict[str, Any] | None:
        text = self.echo.get(index)
        return self._chunk(index, text, None, None) if text else None

    def delta(self, index: int, chunk: router_pb2.GenerateChunk) -> dict[str, Any] | None:
        if not chunk.text and not chunk.logprobs:
            return None
        return self._chunk(index, chunk.text, self._logprobs(index, chunk.logprobs), None)

    def finish(self, state: ChoiceState) -> dict[str, Any]:
        return self._chunk(state.index, "", None, state.finish_reason)

    def choice(self, state: ChoiceState) -> dict[str, Any]:
        text = self.echo.get(state.index, "") + "".join(state.text)
        return {"index": state.index, "text": text, "logprobs": self._logprobs(state.index, state.logprobs),
                "finish_reason": state.finish_reason}

    def _chunk(self, index: int, text: str | None, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return self.chunk({"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish})

    def _logprobs(self, index: int, entries: Any) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        result: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self.offsets.get(index, len(self.echo.get(index, "")))
        for entry in entries:
            token = self.tokenizer.token_text(entry.token_id)
            # OpenAI: the top N alternatives, plus the sampled token when it is not among them.
            top = {self.tokenizer.token_text(t.token_id): t.logprob for t in entry.top[:self.logprobs]}
            top.setdefault(token, entry.logprob)
            result["tokens"].append(token)
            result["token_logprobs"].append(entry.logprob)
            result["top_logprobs"].append(top)
            result["text_offset"].append(offset)
            offset += len(token)
        self.offsets[index] = offset
        return result


class ChatFormat(ResponseFormat):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args: Any, logprobs: bool, top_logprobs: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs

    def start(self, index: int) -> dict[str, Any]:
        return self._chunk(index, {"role": "assistant", "content": ""}, None, None)

    def delta(self, index: int, chunk: router_pb2.GenerateChunk) -> dict[str, Any] | None:
        if not chunk.text and not chunk.logprobs:
            return None
        return self._chunk(index, {"content": chunk.text}, self._logprobs(chunk.logprobs), None)

    def finish(self, state: ChoiceState) -> dict[str, Any]:
        return self._chunk(state.index, {}, None, state.finish_reason)

    def choice(self, state: ChoiceState) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(state.text)}
        return {"index": state.index, "message": message, "logprobs": self._logprobs(state.logprobs),
                "finish_reason": state.finish_reason}

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        return self.chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})

    def _logprobs(self, entries: Any) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = []
        for entry in entries:
            top = [self._token(t.token_id, t.logprob) for t in entry.top[:self.top_logprobs]]
            content.append({**self._token(entry.token_id, entry.logprob), "top_logprobs": top})
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.token_text(token_id)
        # The UTF-8 of the token's text: a token holding part of a character shows U+FFFD's bytes.
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
