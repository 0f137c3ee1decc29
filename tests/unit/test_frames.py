"""The data plane's framing: length-prefixed messages, whole however the bytes arrive, bounded in size;
a big tensor written from its own memory parses as the message in one piece."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from moe_core import codec, frames
from moe_core.pb import expert_pb2
from moe_core.rpc import MAX_MESSAGE_BYTES


def test_frames_come_out_whole_however_the_bytes_are_cut():
    payloads = [b"", b"a", bytes(range(256)) * 40]
    stream = b"".join(frames.pack(p) for p in payloads)
    for cut in (1, 3, 4, 5, 1000, len(stream)):
        buffer, got = frames.FrameBuffer(), []
        for start in range(0, len(stream), cut):
            got += buffer.feed(stream[start:start + cut])
        assert got == payloads, f"cut every {cut} bytes"


def test_an_oversized_frame_is_refused_before_it_is_read():
    header = frames.HEADER.pack(MAX_MESSAGE_BYTES + 1)
    with pytest.raises(frames.FrameError, match="exceeds"):
        frames.FrameBuffer().feed(header)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header)
        with pytest.raises(frames.FrameError, match="exceeds"):
            frames.read_frame(b)


def test_read_frame_reads_across_partial_sends_and_reports_a_cut_stream():
    a, b = socket.socketpair()
    with a, b:
        message = frames.pack(b"x" * 100_000)
        a.sendall(message[:3])
        a.sendall(message[3:50])
        a.sendall(message[50:])
        assert bytes(frames.read_frame(b)) == b"x" * 100_000
        a.sendall(frames.pack(b"half")[:6])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(frames.FrameError, match="closed"):
            frames.read_frame(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 300])  # 300 rows: lengths past one varint byte
def test_a_tensor_kept_apart_parses_as_the_message_in_one_piece(dtype, rows):
    hidden = torch.randn(rows, 64).to(dtype)
    head, raw = codec.encode_apart(hidden)
    request = expert_pb2.ExpertRequest(model_revision="r1", layer=3, hidden=head, step_id=9, request_ids=["a", "b"],
                                       expert_ids=codec.encode(torch.zeros(rows, 2, dtype=torch.int32)))
    outgoing = frames.Outgoing(request, "hidden", raw)
    whole = outgoing.whole()
    assert not request.hidden.data  # whole() copies; the message kept apart stays without data
    framed = b"".join(bytes(b) for b in outgoing.buffers())
    (got,) = frames.FrameBuffer().feed(framed)
    parsed = expert_pb2.ExpertRequest.FromString(got)
    assert parsed == whole
    assert list(parsed.hidden.shape) == [rows, 64] and torch.equal(codec.decode(parsed.hidden), hidden)
    assert frames.Outgoing(whole).buffers() == [frames.pack(whole.SerializeToString())]


class Trickle:
    """A socket whose sendmsg takes at most `most` bytes a call, as a socket with a timeout may."""

    def __init__(self, sock: socket.socket, most: int):
        self.sock, self.most, self.calls = sock, most, 0

    def sendmsg(self, buffers) -> int:
        self.calls += 1
        chunk = b"".join(bytes(b) for b in buffers)[:self.most]
        self.sock.sendall(chunk)
        return len(chunk)


@pytest.mark.parametrize("most", [1, 7, 1000])  # cuts inside the header, inside and between buffers
def test_send_writes_every_buffer_in_order_across_partial_sends(most):
    a, b = socket.socketpair()
    payload = torch.arange(5_000, dtype=torch.int32)
    head, raw = codec.encode_apart(payload)
    buffers = frames.Outgoing(expert_pb2.ExpertResponse(step_id=4, output=head), "output", raw).buffers()
    trickle = Trickle(a, most)
    with a, b:
        writer = threading.Thread(target=frames.send, args=(trickle, buffers))
        writer.start()
        response = expert_pb2.ExpertResponse.FromString(frames.read_frame(b))
        writer.join()
    assert response.step_id == 4 and torch.equal(codec.decode(response.output), payload)
    assert trickle.calls == -(-sum(len(x) for x in buffers) // most)
