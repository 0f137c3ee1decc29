"""The gRPC face of an expert shard.

Every forward runs on one worker thread, the process's only compute thread (with the intra-op
threads the service was given; the event loop's thread stays serial, see moe_core/threads.py), so
health checks and Describe stay answered while a large batch computes. Decode rows were once computed
right on the event loop to save the thread hop, but then the loop's thread and the worker each owned
an OpenMP team, and every torch op in the process paid for it (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from expert_service.metrics import ExpertMetrics
from expert_service.shard import ExpertShard
from moe_core.pb import expert_pb2, expert_pb2_grpc
from moe_core.rpc import StatusError
from moe_core.threads import use_threads

log = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, shard: ExpertShard, metrics: ExpertMetrics | None = None, threads: int | None = None):
        """`threads`: torch intra-op threads of the compute thread (None: leave torch's setting alone)."""
        self.shard, self.metrics = shard, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts",
                                           initializer=None if threads is None else use_threads,
                                           initargs=() if threads is None else (threads,))

    async def _run(self, request: expert_pb2.ExpertRequest) -> expert_pb2.ExpertResponse:
        try:
            response = await asyncio.get_running_loop().run_in_executor(self.executor, self.shard.forward, request)
        except StatusError as exc:
            if self.metrics:
                self.metrics.requests.labels(exc.code.name).inc()
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug("layer %d step %d: %d rows in %.2f ms", request.layer, request.step_id,
                      request.hidden.shape[0] if request.hidden.shape else 0, 1e3 * response.compute_seconds,
                      extra={"request_id": ",".join(request.request_ids)})
        if self.metrics:
            self.metrics.requests.labels("OK").inc()
            self.metrics.forward.labels(str(request.layer)).observe(response.compute_seconds)
            self.metrics.rows.observe(request.hidden.shape[0] if request.hidden.shape else 0)
        return response

    async def Forward(self, request, context):
        return await self._run(request)

    async def ForwardStream(self, request_iterator, context):
        async for request in request_iterator:
            try:
                yield await self._run(request)
            except StatusError as exc:  # one bad message must not tear down the stream
                yield expert_pb2.ExpertResponse(step_id=request.step_id,
                                                error=expert_pb2.Error(code=exc.code.value[0], message=exc.message))

    async def Describe(self, request, context):
        return self.shard.describe()
