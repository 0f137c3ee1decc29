"""HTTP plumbing: bounded JSON bodies, server-sent events, and noticing that the client went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, bad_request

T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the response was ready."""


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than the limit of {limit} bytes.")


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON; 413 beyond `limit` bytes (declared or actually sent), 400 when malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for part in request.stream():  # counted as it arrives: Content-Length may be absent or wrong
        body += part
        if len(body) > limit:
            raise too_large(limit)
    if not body:
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.") from None
    check_text(value)
    return value


def check_text(value: Any) -> None:
    """400 for a string holding an unpaired surrogate (JSON's `\\ud800`): no tokenizer or encoder takes one."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("The request body has a string with an unpaired surrogate (such as \\ud800), "
                                  "which is not valid Unicode text.") from None


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has closed the connection (the body must already be read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientDisconnected (after cancelling `work`) if the client leaves first.

    The server does not cancel a handler when its client goes away; without this a dropped request would
    keep its router calls running to the end.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class EventStream(StreamingResponse):
    """An SSE response that closes its generator, and so the router calls, as soon as the client leaves.

    Starlette notices a disconnect only on some ASGI versions and never closes the body iterator itself;
    here both happen on every server, so a dropped stream frees its sequences at once.
    """

    def __init__(self, content: AsyncGenerator[bytes, None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.create_task(self.stream_response(send))
        watcher = asyncio.create_task(wait_disconnect(receive))
        ended = False
        try:
            done, _ = await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
            ended = streaming in done
        finally:
            for task in (streaming, watcher):
                task.cancel()
            await asyncio.gather(streaming, watcher, return_exceptions=True)
            await self.events.aclose()
        failure = streaming.exception() if ended else None
        if not ended or isinstance(failure, OSError):  # OSError: the client is gone mid-send
            mark_disconnected(scope)
        elif failure is not None:
            raise failure


def mark_disconnected(scope: Scope) -> None:
    """Note for the access log and metrics that the client left before its response ended (not an error)."""
    scope.setdefault("state", {})["client_disconnected"] = True
