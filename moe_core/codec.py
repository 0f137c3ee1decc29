"""Tensors on the wire: raw little-endian bytes with dtype and shape (`moe.v1.Tensor`).

Decoding is zero-copy: the tensor is a view of the message's bytes (read-only; callers that write
into a received tensor must copy it first).
"""

from __future__ import annotations

import sys
import warnings

import torch

from moe_core.pb import tensor_pb2

TO_WIRE = {torch.float32: tensor_pb2.DTYPE_FLOAT32, torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
           torch.float16: tensor_pb2.DTYPE_FLOAT16, torch.int32: tensor_pb2.DTYPE_INT32}
FROM_WIRE = {v: k for k, v in TO_WIRE.items()}
# frombuffer over immutable `bytes` warns that writes would be undefined; received tensors are only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("moe_core.codec assumes a little-endian host")


class CodecError(ValueError):
    """A Tensor message that does not describe a valid tensor."""


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    message, raw = encode_apart(tensor)
    message.data = raw.tobytes()
    return message


def encode_apart(tensor: torch.Tensor) -> tuple[tensor_pb2.Tensor, memoryview]:
    """The tensor's dtype and shape as a message without `data`, and its bytes as a view of its memory.

    For a data plane that writes the bytes to the socket straight from the tensor (moe_core/frames.py):
    putting 1.5 MB into a message and serializing it costs four copies (≈ 1 ms) on the router."""
    if tensor.dtype not in TO_WIRE:
        raise CodecError(f"dtype {tensor.dtype} cannot be sent; use one of {list(TO_WIRE)}")
    cpu = tensor.detach().contiguous().cpu()
    raw = cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu  # numpy has no bfloat16
    data = memoryview(raw.reshape(-1).numpy()).cast("B")  # the view keeps the array, the array the tensor, alive
    return tensor_pb2.Tensor(dtype=TO_WIRE[tensor.dtype], shape=list(tensor.shape)), data


def decode(message: tensor_pb2.Tensor, name: str = "tensor", dtype: torch.dtype | None = None,
           ndim: int | None = None) -> torch.Tensor:
    """The tensor a message describes; CodecError naming `name` if it is malformed or not as expected."""
    if message.dtype not in FROM_WIRE:
        raise CodecError(f"{name}: unknown dtype {message.dtype}")
    got = FROM_WIRE[message.dtype]
    if dtype is not None and got != dtype:
        raise CodecError(f"{name}: dtype {_name(got)}, expected {_name(dtype)}")
    shape = list(message.shape)
    if ndim is not None and len(shape) != ndim:
        raise CodecError(f"{name}: {len(shape)} dimensions {shape}, expected {ndim}")
    if any(d < 0 for d in shape):
        raise CodecError(f"{name}: negative dimension in {shape}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = got.itemsize
    data = message.data  # each read of a bytes field is a new copy of it
    if len(data) != numel * itemsize:
        raise CodecError(f"{name}: {len(data)} bytes for shape {shape} of {_name(got)} "
                         f"(expected {numel * itemsize})")
    if numel == 0:
        return torch.empty(shape, dtype=got)
    return torch.frombuffer(data, dtype=got).view(shape)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
