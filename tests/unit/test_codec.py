from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core import codec
from moe_core.pb import tensor_pb2

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3), st.integers(0, 2**31 - 1))
def test_roundtrip_is_exact(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 100).to(dtype)
    message = tensor_pb2.Tensor.FromString(codec.encode(x).SerializeToString())
    y = codec.decode(message)
    assert y.dtype == dtype and list(y.shape) == shape and torch.equal(x, y)


def test_non_contiguous_input_is_sent_in_logical_order():
    x = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(codec.decode(codec.encode(x)), x)


@pytest.mark.parametrize("message,expected", [
    (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "unknown dtype"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 15), "15 bytes for shape"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1], data=b""), "negative dimension"),
])
def test_malformed_messages_are_refused(message, expected):
    with pytest.raises(codec.CodecError, match=expected):
        codec.decode(message, "x")


def test_expectations_are_checked():
    message = codec.encode(torch.zeros(2, 3))
    with pytest.raises(codec.CodecError, match="dtype float32, expected int32"):
        codec.decode(message, "ids", torch.int32)
    with pytest.raises(codec.CodecError, match="2 dimensions"):
        codec.decode(message, "ids", ndim=3)
    with pytest.raises(codec.CodecError, match="cannot be sent"):
        codec.encode(torch.zeros(2, dtype=torch.int64))
