"""The gRPC face of an expert shard.

Every forward runs right on the event loop's thread, the process's only compute thread. Large
batches once went to a worker thread so that health checks stayed answered meanwhile, but then two
threads each owned an OpenMP team and every torch op in the process paid for it (moe_core/threads.py):
on cluster-2 at concurrency 32 the worker thread measured 187 output tok/s, one thread 220
(bench/RESULTS.md). A health check now waits at most one layer step's compute (milliseconds).
"""

from __future__ import annotations

import logging

from expert_service.metrics import ExpertMetrics
from expert_service.shard import ExpertShard
from moe_core import frames
from moe_core.pb import expert_pb2, expert_pb2_grpc
from moe_core.rpc import StatusError

log = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, shard: ExpertShard, metrics: ExpertMetrics | None = None):
        self.shard, self.metrics = shard, metrics

    def run(self, request: expert_pb2.ExpertRequest) -> frames.Outgoing:
        """One message's answer; raises StatusError for a request it refuses."""
        try:
            outgoing = self.shard.forward(request)
        except StatusError as exc:
            if self.metrics:
                self.metrics.requests.labels(exc.code.name).inc()
            raise
        response = outgoing.message
        if log.isEnabledFor(logging.DEBUG):
            log.debug("layer %d step %d: %d rows in %.2f ms", request.layer, request.step_id,
                      request.hidden.shape[0] if request.hidden.shape else 0, 1e3 * response.compute_seconds,
                      extra={"request_id": ",".join(request.request_ids)})
        if self.metrics:
            self.metrics.requests.labels("OK").inc()
            self.metrics.forward.labels(str(request.layer)).observe(response.compute_seconds)
            self.metrics.rows.observe(request.hidden.shape[0] if request.hidden.shape else 0)
        return outgoing

    def answer(self, request: expert_pb2.ExpertRequest) -> frames.Outgoing:
        """One message's answer on a stream: a refused message gets `error` set and the stream stays open."""
        try:
            return self.run(request)
        except StatusError as exc:
            return frames.Outgoing(expert_pb2.ExpertResponse(
                step_id=request.step_id, error=expert_pb2.Error(code=exc.code.value[0], message=exc.message)))

    async def Forward(self, request, context):
        return self.run(request).whole()

    async def ForwardStream(self, request_iterator, context):
        async for request in request_iterator:
            yield self.answer(request).whole()

    async def Describe(self, request, context):
        return self.shard.describe()
