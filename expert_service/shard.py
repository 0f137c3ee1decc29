"""One shard of experts: validates a request, runs the grouped expert FFN, counts the rows it served."""

from __future__ import annotations

import time

import grpc
import torch

from moe_core import codec, frames
from moe_core.config import MoeConfig
from moe_core.dtypes import NAMES
from moe_core.experts import UnknownExpertError, expert_forward
from moe_core.pb import expert_pb2
from moe_core.rpc import StatusError
from moe_core.weights import LayerExperts

INVALID = grpc.StatusCode.INVALID_ARGUMENT


class ExpertShard:
    def __init__(self, cfg: MoeConfig, experts: dict[int, LayerExperts], *, model_id: str, revision: str,
                 shard_id: str, replica_id: str, dtype: torch.dtype, device: str, ffn: tuple[int, int] = (0, 1)):
        self.cfg, self.experts, self.ffn = cfg, experts, ffn
        self.model_id, self.revision, self.shard_id, self.replica_id = model_id, revision, shard_id, replica_id
        self.dtype, self.device = dtype, device
        self.rows = [[0] * cfg.num_experts for _ in range(cfg.num_hidden_layers)]  # [layer][expert] rows computed
        self.data_port = 0  # set once the data plane listens

    def forward(self, request: expert_pb2.ExpertRequest) -> frames.Outgoing:
        """The ExpertResponse, its output rows kept apart (the data plane writes them from the tensor)."""
        started = time.perf_counter()
        hidden, ids, weights = self._inputs(request)
        with torch.inference_mode():
            try:
                out = expert_forward(self.experts[request.layer], hidden.to(self.device, self.dtype),
                                     ids.to(self.device, torch.int64), weights.to(self.device),
                                     count_into=self.rows[request.layer])
            except UnknownExpertError as exc:
                raise StatusError(INVALID, f"shard {self.shard_id}: {exc}") from None
        output, raw = codec.encode_apart(out.to(hidden.dtype))
        response = expert_pb2.ExpertResponse(step_id=request.step_id, output=output,
                                             compute_seconds=time.perf_counter() - started)
        return frames.Outgoing(response, "output", raw)

    def _inputs(self, request: expert_pb2.ExpertRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if request.model_revision != self.revision:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"model revision mismatch: shard {self.shard_id} serves {self.revision}, "
                              f"the request is for {request.model_revision or '(none)'}")
        if request.layer not in self.experts:
            raise StatusError(INVALID, f"shard {self.shard_id} holds no experts of layer {request.layer} "
                                       f"(holds layers {sorted(self.experts)})")
        try:
            hidden = codec.decode(request.hidden, "hidden", ndim=2)
            ids = codec.decode(request.expert_ids, "expert_ids", torch.int32, ndim=2)
            weights = codec.decode(request.expert_weights, "expert_weights", torch.float32, ndim=2)
        except codec.CodecError as exc:
            raise StatusError(INVALID, str(exc)) from None
        if hidden.dtype == torch.int32:
            raise StatusError(INVALID, "hidden: must be a floating-point tensor")
        if hidden.shape[1] != self.cfg.hidden_size:
            raise StatusError(INVALID, f"hidden: width {hidden.shape[1]}, the model's hidden size is "
                                       f"{self.cfg.hidden_size}")
        if ids.shape != weights.shape or ids.shape[0] != hidden.shape[0]:
            raise StatusError(INVALID, f"shapes disagree: hidden {list(hidden.shape)}, expert_ids "
                                       f"{list(ids.shape)}, expert_weights {list(weights.shape)}")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.cfg.num_experts):
            raise StatusError(INVALID, f"expert_ids must be -1 or in [0, {self.cfg.num_experts})")
        return hidden, ids, weights

    def describe(self) -> expert_pb2.ShardInfo:
        pairs = [expert_pb2.ExpertPair(layer=layer, expert=e, rows=self.rows[layer][e])
                 for layer, held in sorted(self.experts.items()) for e in held.expert_ids]
        return expert_pb2.ShardInfo(model_id=self.model_id, model_revision=self.revision, shard_id=self.shard_id,
                                    experts=pairs, dtype=NAMES[self.dtype], device=str(self.device),
                                    hidden_size=self.cfg.hidden_size, num_experts=self.cfg.num_experts,
                                    replica_id=self.replica_id, data_port=self.data_port,
                                    ffn_part=self.ffn[0], ffn_parts=self.ffn[1])
