"""Client side of `moe.v1.RouterService` over one or more routers, each serving whole requests.

A request goes to the router its prompt's first tokens hash to (rendezvous hashing over the addresses,
so every gateway replica agrees and adding a router moves only the prompts that now hash to it): a
repeated prompt, the choices of one prompt, a shared system prompt or a conversation's next turn then
meet the KV blocks that router's prefix cache holds. That router is passed over when it has
AFFINITY_SLACK more requests in flight than the least busy one, or when it just failed to answer;
then, and with affinity off, the router with the fewest requests in flight from this gateway takes it
(least recently picked among equals, so idle traffic still spreads).
gRPC errors become `GatewayError`s carrying the HTTP status the client should see.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from gateway.errors import GatewayError, retry_after, timed_out
from moe_core.logs import REQUEST_ID_HEADER
from moe_core.pb import router_pb2, router_pb2_grpc
from moe_core.rpc import from_server

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # long prompts and logprob-heavy chunks exceed gRPC's 4 MiB default
FAILURE_COOLDOWN_S = 5.0  # how long a router that did not answer sorts behind the others
INFO_TIMEOUT_S = 5.0
RETRY_AFTER_S = 1  # queue full or no capacity: worth trying again soon
AFFINITY_SLACK = 8  # requests in flight a prompt's own router may have beyond the least busy one

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def error_from_rpc(exc: grpc.aio.AioRpcError) -> GatewayError:
    """The client-facing error for a failed router call."""
    code, details = exc.code(), exc.details() or ""
    status = HTTP_STATUS.get(code, 500)
    headers = retry_after(RETRY_AFTER_S) if status in (429, 503) else None
    if status == 504:
        return timed_out()
    if status == 503 and not (from_server(exc) and details):  # the transport's details name sockets, not causes
        return GatewayError(503, "No router is reachable to serve the request; try again shortly.", headers=headers)
    if status == 500:
        log.error("router call failed: %s %s", code.name, details)
        return GatewayError(500, "The model server failed while processing the request.")
    return GatewayError(status, details or code.name.lower().replace("_", " "), headers=headers)


@dataclass
class _Router:
    address: str
    in_flight: int = 0
    last_pick: int = 0
    failed_at: float = float("-inf")
    channel: grpc.aio.Channel | None = None
    _stub: router_pb2_grpc.RouterServiceStub | None = field(default=None, repr=False)

    def stub(self) -> router_pb2_grpc.RouterServiceStub:
        # Opened on first use: a grpc.aio channel belongs to the event loop that is running when it is made.
        if self._stub is None:
            options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
            self.channel = grpc.aio.insecure_channel(self.address, options=options)
            self._stub = router_pb2_grpc.RouterServiceStub(self.channel)
        return self._stub

    def cooling_down(self, now: float) -> bool:
        return now - self.failed_at < FAILURE_COOLDOWN_S


class RouterPool:
    """The routers behind this gateway: generation with failover, model info and readiness."""

    def __init__(self, addresses: Sequence[str], affinity_tokens: int = 256):
        if not addresses:
            raise ValueError("RouterPool needs at least one router address")
        self._routers = [_Router(address) for address in addresses]
        self.affinity_tokens = affinity_tokens  # 0: no prompt affinity, the least busy router always
        self._picks = itertools.count(1)
        self._info: router_pb2.ModelInfo | None = None

    @property
    def addresses(self) -> list[str]:
        return [router.address for router in self._routers]

    def in_flight(self) -> dict[str, int]:
        return {router.address: router.in_flight for router in self._routers}

    async def generate(self, prompt_ids: Sequence[int], sampling: router_pb2.SamplingParams, request_id: str,
                       *, timeout_s: float | None = None,
                       trace_id: str | None = None, prefer: str | None = None
                       ) -> AsyncIterator[router_pb2.GenerateChunk]:
        """Stream one generation. Closing or cancelling the iteration cancels the call, freeing the sequence.

        `trace_id` (the HTTP request's id) travels as `x-request-id` metadata, so the router's logs carry it.
        It goes to `prefer` (an address from `choose`), by default the prompt's own router (`affinity`),
        unless that one is busy or failing. A router that is UNAVAILABLE before its first chunk is
        retried once on another router.
        """
        request = router_pb2.GenerateRequest(request_id=request_id, prompt_ids=prompt_ids, sampling=sampling)
        metadata = ((REQUEST_ID_HEADER, trace_id),) if trace_id else None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        tried: set[str] = set()
        prefer = prefer or self.affinity(prompt_ids)
        while True:
            router = self._pick(exclude=tried, prefer=prefer)
            tried.add(router.address)
            timeout = _remaining(deadline)
            started = False
            router.in_flight += 1
            call = router.stub().Generate(request, timeout=timeout, metadata=metadata)
            try:
                async for chunk in call:
                    started = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not started:
                    router.failed_at = time.monotonic()
                    if len(tried) == 1 and len(self._routers) > 1:
                        log.warning("router %s unavailable (%s); trying another", router.address, exc.details())
                        continue
                raise error_from_rpc(exc) from None
            finally:
                router.in_flight -= 1
                call.cancel()  # a no-op after the end; otherwise the consumer left early and the router must stop

    async def model_info(self, refresh: bool = False) -> router_pb2.ModelInfo:
        """The served model's info from the first router that answers (cached: it is fixed per model)."""
        if self._info is None or refresh:
            self._info = await self._first_answer("GetModelInfo", router_pb2.ModelInfoRequest())
        return self._info

    async def cluster_status(self, timeout_s: float = 2.0) -> router_pb2.ClusterStatus:
        """A ready router's status, else a not-ready status whose reason covers every router."""
        results = await asyncio.gather(*(self._status_of(router, timeout_s) for router in self._routers))
        for status in results:
            if status.ready:
                return status
        reasons = [f"router {router.address}: {status.reason or 'not ready'}"
                   for router, status in zip(self._routers, results, strict=True)]
        return router_pb2.ClusterStatus(ready=False, reason="; ".join(reasons))

    async def expert_stats(self, timeout_s: float = 5.0) -> list[router_pb2.ExpertStats]:
        """Every reachable router's expert statistics."""
        async def one(router: _Router) -> router_pb2.ExpertStats | None:
            try:
                return await router.stub().GetExpertStats(router_pb2.ExpertStatsRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return None

        return [s for s in await asyncio.gather(*(one(r) for r in self._routers)) if s is not None]

    async def close(self) -> None:
        for router in self._routers:
            if router.channel is not None:
                await router.channel.close()

    def affinity(self, prompt_ids: Sequence[int]) -> str | None:
        """The router whose prefix cache a prompt belongs in: the highest hash of (its first
        `affinity_tokens` tokens, address). None with one router or affinity off."""
        if self.affinity_tokens <= 0 or len(self._routers) == 1:
            return None
        head = array("q", prompt_ids[:self.affinity_tokens]).tobytes()
        return max(self.addresses,
                   key=lambda address: hashlib.blake2b(address.encode() + b"\0" + head, digest_size=8).digest())

    def choose(self, prompt_ids: Sequence[int]) -> str:
        """Where a prompt's requests that should land together (its `n` choices) go: its own router,
        else the one the next request would go to."""
        return self.affinity(prompt_ids) or self._pick(exclude=set()).address

    def _pick(self, exclude: set[str], prefer: str | None = None) -> _Router:
        now = time.monotonic()
        candidates = [router for router in self._routers if router.address not in exclude] or self._routers
        least = min(candidates, key=lambda r: (r.cooling_down(now), r.in_flight, r.last_pick))
        preferred = next((r for r in candidates if r.address == prefer and not r.cooling_down(now)), None)
        busy = preferred is None or preferred.in_flight > least.in_flight + AFFINITY_SLACK
        router = least if busy else preferred
        router.last_pick = next(self._picks)
        return router

    async def _first_answer(self, method: str, request: object) -> object:
        now = time.monotonic()
        failure: grpc.aio.AioRpcError | None = None
        for router in sorted(self._routers, key=lambda r: r.cooling_down(now)):
            try:
                return await getattr(router.stub(), method)(request, timeout=INFO_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                router.failed_at = time.monotonic()
                failure = exc
        assert failure is not None
        raise error_from_rpc(failure)

    async def _status_of(self, router: _Router, timeout_s: float) -> router_pb2.ClusterStatus:
        try:
            return await router.stub().GetClusterStatus(router_pb2.ClusterStatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            reason = "unreachable" if exc.code() == grpc.StatusCode.UNAVAILABLE else exc.code().name.lower()
            return router_pb2.ClusterStatus(ready=False, reason=reason)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise timed_out()
    return remaining
