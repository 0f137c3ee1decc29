"""The expert data plane: ForwardStream's messages, framed on a plain TCP (or TLS) connection.

Each connection is one router's stream: requests are answered in order, each computed inline on the
event loop's thread like the gRPC path (the process's one compute thread, moe_core/threads.py). A
message the shard refuses is answered with `error` set and the connection stays open; broken framing
closes the connection (the router retries the step elsewhere). Health, Describe and the unary Forward
stay on gRPC; Describe advertises this port (`ShardInfo.data_port`).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
from google.protobuf.message import DecodeError

from expert_service.servicer import ExpertServicer
from moe_core import frames
from moe_core.pb import expert_pb2
from moe_core.rpc import Tls

log = logging.getLogger(__name__)


class _Connection(asyncio.Protocol):
    def __init__(self, servicer: ExpertServicer):
        self.servicer = servicer
        self.buffer = frames.FrameBuffer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.buffer.feed(data)
        except frames.FrameError as exc:
            log.warning("data plane: closing a connection from %s: %s", self._peer(), exc)
            self.transport.close()
            return
        for payload in messages:
            for buffer in self._answer(payload).buffers():  # the transport copies only what the socket won't take
                self.transport.write(buffer)

    def _answer(self, payload: bytes) -> frames.Outgoing:
        try:
            request = expert_pb2.ExpertRequest.FromString(payload)
        except DecodeError as exc:
            return frames.Outgoing(expert_pb2.ExpertResponse(error=expert_pb2.Error(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"not an ExpertRequest: {exc}")))
        try:
            return self.servicer.answer(request)
        except Exception:  # a bug must cost this message, not the connection or the process
            log.exception("data plane: layer %d step %d failed", request.layer, request.step_id)
            return frames.Outgoing(expert_pb2.ExpertResponse(step_id=request.step_id, error=expert_pb2.Error(
                code=grpc.StatusCode.INTERNAL.value[0], message="internal error in the expert service")))

    def _peer(self) -> str:
        return str(self.transport.get_extra_info("peername")) if self.transport else "?"


async def serve_data_plane(servicer: ExpertServicer, host: str, port: int, tls: Tls | None = None
                           ) -> asyncio.Server:
    """Listen on host:port (0: a free port); the caller reads the bound port from the server's sockets."""
    context = frames.server_context(tls) if tls else None
    return await asyncio.get_running_loop().create_server(lambda: _Connection(servicer), host, port, ssl=context)


def bound_port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]
