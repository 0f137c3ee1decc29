"""The data plane's framing: length-prefixed messages, whole however the bytes arrive, bounded in size."""

from __future__ import annotations

import socket

import pytest

from moe_core import frames
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
