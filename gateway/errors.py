"""The gateway's one error type, rendered as OpenAI's nested `{"error": {...}}` body with its HTTP status."""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse

# OpenAI's `type` per status; clients switch on the status, people read the type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # what OpenAI answers for a missing or wrong key
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}
DEFAULT_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


class GatewayError(Exception):
    """An error the client sees: HTTP status, a user-facing message, and the offending parameter if any."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.message = message
        self.param = param
        self.code = code if code is not None else DEFAULT_CODES.get(status)
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param)


def model_not_found(name: str) -> GatewayError:
    return GatewayError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def retry_after(seconds: float) -> dict[str, str]:
    """The `Retry-After` header: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def timed_out() -> GatewayError:
    return GatewayError(504, "The request timed out before the model finished.")


def internal_error() -> GatewayError:
    # Never the exception's own text: it can carry paths, addresses or prompt fragments.
    return GatewayError(500, "The server had an error while processing your request.")
