"""The gRPC face of an expert shard.

A decode step's few rows are computed right on the event loop: handing them to a thread would cost
more than the math. Larger batches (prefill chunks) run on one worker thread, so health checks and
Describe stay answered while they compute.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from expert_service.metrics import ExpertMetrics
from expert_service.shard import ExpertShard
from moe_core.pb import expert_pb2, expert_pb2_grpc
from moe_core.rpc import StatusError

INLINE_ROWS = 64
log = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, shard: ExpertShard, metrics: ExpertMetrics | None = None):
        self.shard, self.metrics = shard, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")

    async def _run(self, request: expert_pb2.ExpertRequest) -> expert_pb2.ExpertResponse:
        try:
            if request.hidden.shape and request.hidden.shape[0] <= INLINE_ROWS:
                response = self.shard.forward(request)
            else:
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
