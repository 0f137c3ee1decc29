"""The router's gRPC face: Generate streams the engine's outputs; the rest reports model and cluster state."""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from moe_core.errors import MoeServeError, RequestError
from moe_core.logs import REQUEST_ID, REQUEST_ID_HEADER
from moe_core.pb import router_pb2, router_pb2_grpc
from moe_core.rpc import StatusError
from router_service.engine.engine import RequestOutput
from router_service.engine.loop import EngineLoop
from router_service.engine.params import SamplingParams
from router_service.shard_map import ShardMap

log = logging.getLogger(__name__)


def sampling_from_proto(p: router_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens or 16, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, logprobs=p.logprobs if p.HasField("logprobs") else None,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty)


def chunk_from_output(out: RequestOutput) -> router_pb2.GenerateChunk:
    logprobs = [router_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                        top=[router_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
                for lp in out.logprobs or []]
    return router_pb2.GenerateChunk(token_ids=out.token_ids, text=out.text, logprobs=logprobs,
                                    finished=out.finished, finish_reason=out.finish_reason or "",
                                    prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, loop: EngineLoop, info: router_pb2.ModelInfo, router, max_queue: int = 256):
        self.loop, self.info, self.router, self.max_queue = loop, info, router, max_queue
        self.shard_map: ShardMap | None = router.shard_map
        self.draining = False

    def _admit(self) -> None:
        """Refuse work the router would only queue without bound or fail later anyway."""
        if self.draining:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the router is shutting down; retry on another one")
        if self.loop.engine.num_waiting >= self.max_queue:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the router's queue is full ({self.max_queue} requests waiting); retry shortly")
        down = [s.shard_id for s in self.shard_map.shards if not s.live] if self.shard_map else []
        if down:
            raise StatusError(grpc.StatusCode.UNAVAILABLE,
                              f"expert shard {', '.join(down)} has no live replica; try again shortly")

    async def Generate(self, request, context):
        incoming = dict(context.invocation_metadata() or ())
        tag = incoming.get(REQUEST_ID_HEADER) or request.request_id or "req"
        REQUEST_ID.set(tag)
        self._admit()
        params = sampling_from_proto(request.sampling)
        request_id = f"{tag}-{uuid.uuid4().hex[:8]}"
        started, last = time.monotonic(), None
        try:
            async for out in self.loop.astream(list(request.prompt_ids), params, request_id):
                if out.finish_reason == "error":
                    code = grpc.StatusCode.UNAVAILABLE if out.error_code == "unavailable" else grpc.StatusCode.INTERNAL
                    raise StatusError(code, out.error or "generation failed")
                last = out
                yield chunk_from_output(out)
        except RequestError as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except MoeServeError as exc:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        finally:
            if last is not None and last.finished:
                log.info("finished %s: %s, %d prompt + %d generated tokens in %.3fs", request_id, last.finish_reason,
                         last.prompt_tokens, last.completion_tokens, time.monotonic() - started)
            else:
                log.info("ended %s early (client cancelled or error) after %.3fs", request_id,
                         time.monotonic() - started)

    async def GetModelInfo(self, request, context):
        return self.info

    async def GetClusterStatus(self, request, context):
        engine = self.loop.engine
        status = router_pb2.ClusterStatus(running=engine.num_running, waiting=engine.num_waiting,
                                          ready=not self.draining, reason="draining" if self.draining else "")
        for shard in self.shard_map.shards if self.shard_map else []:
            replicas = [router_pb2.ReplicaStatus(address=r.address, live=r.live, outstanding=r.load,
                                                 last_error=r.last_error) for r in shard.replicas]
            status.shards.append(router_pb2.ShardStatus(shard_id=shard.shard_id, replicas=replicas))
        stats = self.router.grpc_experts.stats if self.router.grpc_experts else None
        if stats is not None:
            status.dispatch.CopyFrom(router_pb2.DispatchStats(
                calls=stats.calls, seconds=stats.seconds, retries=stats.retries,
                shard_compute_seconds=stats.shard_compute_seconds))
        down = [s.shard_id for s in self.shard_map.shards if not s.live] if self.shard_map else []
        if down and not self.draining:
            status.ready, status.reason = False, f"no live replica for shard(s) {', '.join(down)}"
        return status

    async def GetExpertStats(self, request, context):
        cfg = self.loop.engine.model.cfg
        total, balance = self.router.routing.snapshot()
        return router_pb2.ExpertStats(num_layers=cfg.num_hidden_layers, num_experts=cfg.num_experts,
                                      moe_layers=cfg.moe_layers, tokens=total.reshape(-1).tolist(),
                                      balancedness=[balance.get(layer, 0.0) for layer in cfg.moe_layers],
                                      window_steps=self.router.routing.window)
