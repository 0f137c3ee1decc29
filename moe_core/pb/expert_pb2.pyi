from moe_core.pb import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertRequest(_message.Message):
    __slots__ = ("model_revision", "layer", "hidden", "expert_ids", "expert_weights", "step_id", "request_ids")
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    model_revision: str
    layer: int
    hidden: _tensor_pb2.Tensor
    expert_ids: _tensor_pb2.Tensor
    expert_weights: _tensor_pb2.Tensor
    step_id: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_revision: _Optional[str] = ..., layer: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expert_weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., step_id: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertResponse(_message.Message):
    __slots__ = ("step_id", "output", "error", "compute_seconds")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    output: _tensor_pb2.Tensor
    error: Error
    compute_seconds: float
    def __init__(self, step_id: _Optional[int] = ..., output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertPair(_message.Message):
    __slots__ = ("layer", "expert", "rows")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    rows: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("model_id", "model_revision", "shard_id", "experts", "dtype", "device", "hidden_size", "num_experts", "replica_id", "data_port", "ffn_part", "ffn_parts")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    FFN_PART_FIELD_NUMBER: _ClassVar[int]
    FFN_PARTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_revision: str
    shard_id: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertPair]
    dtype: str
    device: str
    hidden_size: int
    num_experts: int
    replica_id: str
    data_port: int
    ffn_part: int
    ffn_parts: int
    def __init__(self, model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., shard_id: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertPair, _Mapping]]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_experts: _Optional[int] = ..., replica_id: _Optional[str] = ..., data_port: _Optional[int] = ..., ffn_part: _Optional[int] = ..., ffn_parts: _Optional[int] = ...) -> None: ...
