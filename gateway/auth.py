"""API keys and per-client limits, applied to every route except the open ones (health, metrics, schema).

Keys are kept only as SHA-256 digests. A presented key is hashed and compared with `hmac.compare_digest`
against every configured digest, without stopping at a match: the time taken says neither which key
matched nor how much of one did. Logs and metrics name a key by `key_id` (6 hex digits of its digest).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.limits import ClientLimits

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
MISSING_KEY = ("You didn't provide an API key. Send it in an Authorization header using Bearer auth "
               "(Authorization: Bearer YOUR_KEY).")
WRONG_KEY = "Incorrect API key provided."


def key_id(digest: bytes) -> str:
    """How logs name a key: the first 6 hex digits of its SHA-256, never the key."""
    return digest.hex()[:6]


class ApiKeys:
    """The configured keys, as digests; `enabled` is False when there are none (authentication off)."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def match(self, presented: bytes) -> bytes | None:
        """The digest of the configured key equal to `presented`, or None."""
        digest = hashlib.sha256(presented).digest()
        found = None
        for known in self._digests:  # all of them, every time
            if hmac.compare_digest(digest, known):
                found = known
        return found


def bearer_token(scope: Scope) -> bytes | None:
    """The credentials of an `Authorization: Bearer ...` header, or None."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key", type="invalid_request_error",
                        headers={"WWW-Authenticate": "Bearer"})


class AccessControl:
    """ASGI middleware: authenticate the client, then admit it under its limits until its response ends.

    Every path not in OPEN_PATHS is guarded, so a route added later cannot be left open by mistake. The
    client's key id goes into `scope["state"]["key_id"]` for the access log.
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys, limits: ClientLimits):
        self.app, self.keys, self.limits = app, keys, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            client = self._client(scope)
            self.limits.admit(client)
        except GatewayError as exc:
            await exc.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limits.release(client)

    def _client(self, scope: Scope) -> object:
        if not self.keys.enabled:
            address = scope.get("client")
            return ("address", address[0] if address else "unknown")
        token = bearer_token(scope)
        if token is None:
            raise unauthorized(MISSING_KEY)
        digest = self.keys.match(token)
        if digest is None:
            raise unauthorized(WRONG_KEY)
        scope.setdefault("state", {})["key_id"] = key_id(digest)
        return digest
