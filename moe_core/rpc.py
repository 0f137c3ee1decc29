"""What every gRPC service here shares: message limits, error mapping, health, ready files, shutdown.

One interceptor turns exceptions into status codes (a `StatusError` keeps its code, anything else is
INTERNAL without internals), and turns request bytes that do not parse into INVALID_ARGUMENT instead
of grpc's generic deserialization failure, so a malformed message gets a clear answer and the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Loopback and in-cluster links: the default 64 KiB window throttles big activation messages.
    ("grpc.http2.bdp_probe", 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A replica that comes back must be reachable within seconds, not after gRPC's 2-minute max backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                  ("grpc.so_reuseport", 0)]


# Trailing metadata on every status our servers set on purpose, so a client can tell "the server said
# UNAVAILABLE (a shard is down)" from "the server could not be reached".
ORIGIN_KEY = "moe-error-origin"
SERVER_ORIGIN = ((ORIGIN_KEY, "server"),)


def from_server(exc: grpc.aio.AioRpcError | grpc.RpcError) -> bool:
    """Whether a failed call's status was set by one of our servers (not by the transport)."""
    metadata = exc.trailing_metadata() or ()
    return any(key == ORIGIN_KEY for key, _ in metadata)


class StatusError(Exception):
    """An error with the gRPC status code the caller should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Malformed:
    def __init__(self, error: Exception):
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Malformed(exc)

    return parse


def _check(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.error}")
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _check(request)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, StatusError):
        await context.abort(exc.code, exc.message, trailing_metadata=SERVER_ORIGIN)
    log.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}",
                        trailing_metadata=SERVER_ORIGIN)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):  # type: ignore[override]
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method), _safe(handler.request_deserializer),
                handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(handler.unary_stream, method, unary_in=True),
                _safe(handler.request_deserializer), handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._server_stream(handler.stream_stream, method, unary_in=False),
                _safe(handler.request_deserializer), handler.response_serializer)
        return handler

    @staticmethod
    def _unary(behavior, method: str):
        async def wrapped(request, context):
            try:
                return await behavior(_check(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)

        return wrapped

    @staticmethod
    def _server_stream(behavior, method: str, unary_in: bool):
        async def wrapped(request, context):
            try:
                arg = _check(request) if unary_in else _checked_stream(request)
                async for response in behavior(arg, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)

        return wrapped


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, services: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *services]:
        await servicer.set(name, status)


@dataclass(frozen=True)
class Tls:
    """PEM files for one side of a TLS connection.

    Server: `cert`/`key` are its identity; `ca`, when set, must have signed every client's certificate
    (mutual TLS). Client: `ca` verifies the server; `cert`/`key`, when set, are its own identity.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None  # client only: the name to check in the server's certificate

    def _read(self, path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self._read(self.key), self._read(self.cert))],
                                           root_certificates=self._read(self.ca), require_client_auth=bool(self.ca))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca), private_key=self._read(self.key),
                                            certificate_chain=self._read(self.cert))


def bind(server: grpc.aio.Server, host: str, port: int, tls: Tls | None = None) -> int:
    """Listen on host:port (0 picks a free port), with TLS when given; return the port actually bound."""
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound


def write_ready_file(path: str | None, **info: Any) -> None:
    """Atomically write {"pid", **info} to `path` so a launcher can learn a port-0 service's port."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as f:
        json.dump({"pid": os.getpid(), **info}, f)
    os.replace(f.name, target)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (for graceful shutdown of an asyncio service)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def channel(address: str, tls: Tls | None = None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    options = [*CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else [])]
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
