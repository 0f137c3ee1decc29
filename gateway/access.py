"""The outermost layer of every request: its id, its overall deadline, the access log, and the last-resort 500.

The request id is the client's `x-request-id` when it is safe to log and pass on (at most 64 characters of
`[A-Za-z0-9._-]`), else a new one. It is set in `REQUEST_ID` for everything the request runs (log lines
carry it), put in `scope["state"]`, and returned in the `x-request-id` header of every response. The
deadline (`request_timeout_s` from arrival, also in `scope["state"]`) is what handlers and router calls work
to; a request still running shortly after it is cut off here, so none can hang.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import OPEN_PATHS
from gateway.errors import internal_error, timed_out
from gateway.metrics import route_template
from moe_core.logs import REQUEST_ID, REQUEST_ID_HEADER

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HARD_CUT_S = 2.0  # past the deadline, for the handlers' own 504 (or a stream's error event) to go out first
HEADER = REQUEST_ID_HEADER.encode()


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(scope: Scope) -> str:
    """The client's request id if it is safe to log and pass on, else a new one."""
    for name, value in scope.get("headers", ()):
        if name.lower() == HEADER:
            text = value.decode("latin-1")
            return text if SAFE_ID.match(text) else new_request_id()
    return new_request_id()


class RequestContext:
    """ASGI middleware that gives each HTTP request its id and deadline and writes its access-log line."""

    def __init__(self, app: ASGIApp, timeout_s: float, draining: Callable[[], bool] = lambda: False):
        self.app, self.timeout_s, self.draining = app, timeout_s, draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["deadline"] = time.monotonic() + self.timeout_s
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status: int | None = None

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                headers.append((HEADER, request_id.encode()))
                if self.draining():  # so keep-alive clients reconnect, to another replica
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            status = await self._run(scope, receive, tagged, lambda: status)
        finally:
            self._log(scope, status, time.perf_counter() - started, request_id)
            REQUEST_ID.reset(token)

    async def _run(self, scope: Scope, receive: Receive, send: Send, sent: Callable[[], int | None]) -> int | None:
        """Run the app within the deadline; answer 504 or 500 if it overran or failed before responding."""
        cut = asyncio.timeout(self.timeout_s + HARD_CUT_S)
        try:
            async with cut:
                await self.app(scope, receive, send)
            return sent()
        except Exception as exc:
            if isinstance(exc, TimeoutError) and cut.expired():
                error = timed_out()
                log.warning("%s %s ran past its deadline; cut off", scope["method"], route_template(scope))
            else:
                error = internal_error()
                log.exception("unexpected error on %s %s", scope["method"], route_template(scope))
            if sent() is not None:
                return sent()  # the response has begun: all that is left is to close the connection
            await error.response()(scope, receive, send)
            return error.status

    def _log(self, scope: Scope, status: int | None, duration_s: float, request_id: str) -> None:
        state = scope.get("state", {})
        route = route_template(scope)
        if state.get("client_disconnected"):
            log.info("client disconnected from %s %s before the response ended (request_id=%s)",
                     scope["method"], route, request_id)
        quiet = scope["path"] in OPEN_PATHS and status is not None and status < 400
        access_log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %s %.1fms request_id=%s key=%s%s",
                       scope["method"], route, status if status is not None else "-", duration_s * 1000,
                       request_id, state.get("key_id", "-"),
                       " client_disconnected" if state.get("client_disconnected") else "")
