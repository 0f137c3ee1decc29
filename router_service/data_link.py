"""The router's end of one replica's data plane: a blocking socket the engine thread writes and reads itself.

No event loop and no other thread sits between the engine and the wire, which is where the gRPC path
spends most of its ≈ 0.7 ms per exchange (moe_core/frames.py). Only the engine thread sends and
receives; another thread may only `abort` a link (a replica marked down), which wakes a blocked read.
Steps may be pipelined: replies come back in order, and one read early is kept for its step.
"""

from __future__ import annotations

import contextlib
import socket

import grpc

from moe_core import frames
from moe_core.pb import expert_pb2
from moe_core.rpc import Tls
from router_service.replica import ReplicaError

MAX_EARLY = 16  # replies kept for steps read out of order; a step has at most two in flight per link


def data_address(grpc_address: str, port: int) -> tuple[str, int]:
    """The data plane lives on the gRPC address's host: "10.0.0.5:50051", 50052 -> ("10.0.0.5", 50052)."""
    host = grpc_address.rpartition(":")[0].strip("[]")
    return host, port


class DataLink:
    """Connects on first use; once it fails it stays failed (the caller makes a new one)."""

    def __init__(self, host: str, port: int, timeout_s: float, tls: Tls | None = None):
        self.host, self.port, self.timeout_s, self.tls = host, port, timeout_s, tls
        self._sock: socket.socket | None = None
        self._early: dict[int, expert_pb2.ExpertResponse] = {}
        self.broken = False
        self.unreachable = False  # the first connect failed: the advertised port may not be routable from here

    def send(self, request: expert_pb2.ExpertRequest | frames.Outgoing) -> None:
        buffers = (request if isinstance(request, frames.Outgoing) else frames.Outgoing(request)).buffers()
        try:
            if self.broken:
                raise OSError("link closed")
            if self._sock is None:
                try:
                    self._sock = self._connect()
                except OSError:
                    self.unreachable = True
                    raise
            frames.send(self._sock, buffers)
        except OSError as exc:
            raise self._fail(grpc.StatusCode.UNAVAILABLE, f"data plane {self.host}:{self.port}: {exc}") from None

    def receive(self, step_id: int) -> expert_pb2.ExpertResponse:
        """The reply to `step_id`; ReplicaError when the link fails or the reply takes over the timeout."""
        if step_id in self._early:
            return self._early.pop(step_id)
        while True:
            try:
                if self._sock is None or self.broken:
                    raise frames.FrameError("link closed")
                response = expert_pb2.ExpertResponse.FromString(frames.read_frame(self._sock))
            except TimeoutError:
                raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {self.timeout_s:.1f}s") from None
            except (OSError, frames.FrameError, ValueError) as exc:  # ValueError: a reply protobuf can't parse
                raise self._fail(grpc.StatusCode.UNAVAILABLE, f"data plane {self.host}:{self.port}: {exc}") from None
            if response.step_id == step_id:
                return response
            self._early[response.step_id] = response
            if len(self._early) > MAX_EARLY:  # replies of steps nobody waits for any more (an aborted step)
                del self._early[min(self._early)]

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = frames.client_context(self.tls).wrap_socket(sock, server_hostname=self.tls.server_name or self.host)
        return sock

    def _fail(self, code: grpc.StatusCode, message: str) -> ReplicaError:
        self.close()
        return ReplicaError(code, message)

    def abort(self) -> None:
        """From any thread: fail the link now, waking a read blocked on it (the owner then closes it)."""
        self.broken = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.broken = True
        self._early.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
