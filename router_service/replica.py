"""One expert-service replica as the router sees it: a channel, a persistent stream, health and load.

Messages go over one bidirectional `ForwardStream` per replica; replies are matched to requests by
step id, so several steps may be in flight on one stream. A transport failure fails every message in
flight, drops the stream, and marks the replica down until a health probe brings it back.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_core.pb import expert_pb2, expert_pb2_grpc
from moe_core.rpc import StatusError, Tls, channel

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SERVICE = "moe.v1.ExpertService"


class ReplicaError(Exception):
    """A call to a replica failed; `retryable` says whether another replica may succeed."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.retryable = code, code in RETRYABLE


class _Stream:
    def __init__(self, stub: expert_pb2_grpc.ExpertServiceStub):
        self.call = stub.ForwardStream()
        self.pending: dict[int, asyncio.Future] = {}
        self.write_lock = asyncio.Lock()
        self.broken: ReplicaError | None = None
        self.reader = asyncio.create_task(self._read())

    async def exchange(self, request: expert_pb2.ExpertRequest, timeout: float) -> expert_pb2.ExpertResponse:
        if self.broken:
            raise self.broken
        future = asyncio.get_running_loop().create_future()
        self.pending[request.step_id] = future
        try:
            async with self.write_lock:
                await self.call.write(request)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ReplicaError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:.1f}s") from None
        except grpc.aio.AioRpcError as exc:
            raise ReplicaError(exc.code(), exc.details() or "") from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise ReplicaError(grpc.StatusCode.UNAVAILABLE, f"stream closed ({exc})") from None
        finally:
            self.pending.pop(request.step_id, None)

    async def _read(self) -> None:
        error = ReplicaError(grpc.StatusCode.UNAVAILABLE, "stream ended")
        try:
            async for response in self.call:
                future = self.pending.get(response.step_id)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = ReplicaError(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = ReplicaError(grpc.StatusCode.CANCELLED, "stream closed")
        self.broken = error
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


class Replica:
    def __init__(self, shard_id: str, address: str, tls: Tls | None = None):
        self.shard_id, self.address, self.tls = shard_id, address, tls
        self._channel: grpc.aio.Channel | None = None  # made on first use, inside the event loop
        self.live = False
        self.outstanding = 0
        self.last_pick = 0  # the shard's pick counter when this replica was last chosen
        self.last_error = ""
        self._stream: _Stream | None = None
        self.data_port = 0  # the replica's data plane (ShardInfo.data_port), 0: none
        self.link = None  # its DataLink, made and used by the engine thread (grpc_experts.py)
        self.link_outstanding = 0  # data-plane calls in flight (counted by the engine thread alone)

    def _connect(self) -> None:
        if self._channel is None:
            self._channel = channel(self.address, self.tls)
            self._stub = expert_pb2_grpc.ExpertServiceStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def stub(self) -> expert_pb2_grpc.ExpertServiceStub:
        self._connect()
        return self._stub

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        self._connect()
        return self._health

    def __repr__(self) -> str:
        return f"Replica({self.shard_id}@{self.address}, live={self.live})"

    async def forward(self, request: expert_pb2.ExpertRequest, timeout: float) -> expert_pb2.ExpertResponse:
        """One message on the replica's stream; raises ReplicaError (transport) or StatusError (message)."""
        if self._stream is None or self._stream.broken:
            self._stream = _Stream(self.stub)
        self.outstanding += 1
        try:
            response = await self._stream.exchange(request, timeout)
        finally:
            self.outstanding -= 1
        return self.checked(response)

    def checked(self, response: expert_pb2.ExpertResponse) -> expert_pb2.ExpertResponse:
        """A stream reply, or the StatusError it carries."""
        if response.HasField("error"):
            code = _CODES.get(response.error.code, grpc.StatusCode.UNKNOWN)
            raise StatusError(code, f"{self.shard_id}@{self.address}: {response.error.message}")
        return response

    @property
    def load(self) -> int:
        return self.outstanding + self.link_outstanding

    async def describe(self, timeout: float) -> expert_pb2.ShardInfo:
        try:
            return await self.stub.Describe(expert_pb2.DescribeRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise ReplicaError(exc.code(), exc.details() or "") from None

    async def healthy(self, timeout: float) -> bool:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self.last_error = f"health check: {exc.code().name}"
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def mark_down(self, reason: str) -> None:
        if self.live:
            log.warning("replica %s of %s is down: %s", self.address, self.shard_id, reason)
        self.live, self.last_error = False, reason
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.link is not None:
            self.link.abort()

    def mark_live(self) -> None:
        if not self.live:
            log.info("replica %s of %s is live", self.address, self.shard_id)
        self.live = True

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self.link is not None:
            self.link.abort()
        if self._channel is not None:
            await self._channel.close()


_CODES = {code.value[0]: code for code in grpc.StatusCode}
