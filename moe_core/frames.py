"""The expert data plane's wire format: length-prefixed protobuf messages on a plain TCP (or TLS) stream.

The router's hot path sends one ExpertRequest per shard per layer step and waits for the ExpertResponse.
Over Python gRPC that exchange costs ≈ 0.7 ms on loopback (the bare stream floor is ≈ 0.52 ms, plus
the hand-offs between the engine thread, the asyncio loop and gRPC's poller); the same messages framed
on a socket the engine thread reads and writes itself cost ≈ 0.17 ms (bench/RESULTS.md, "Expert data
plane"). The messages are exactly the gRPC contract's; only the framing differs: a 4-byte little-endian
length, then the serialized message.
"""

from __future__ import annotations

import socket
import ssl
import struct

from moe_core.rpc import MAX_MESSAGE_BYTES, Tls

HEADER = struct.Struct("<I")


class FrameError(Exception):
    """The peer broke the framing (too large, or the stream ended inside a frame)."""


def pack(payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise FrameError(f"message of {len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return HEADER.pack(len(payload)) + payload


class FrameBuffer:
    """Bytes as they arrive (asyncio's data_received) -> the complete frames among them.

    Each frame's bytes are copied once, into a buffer of the frame's size made when its header is
    complete (a 1 MiB frame in 256 KiB pieces: 0.17 against 0.46 ms when the pieces were joined and the
    frame sliced out and copied again)."""

    def __init__(self):
        self._header = bytearray()
        self._frame: bytearray | None = None  # the frame being filled
        self._filled = 0

    def feed(self, data: bytes) -> list[bytearray]:
        view, at, frames = memoryview(data), 0, []
        while True:
            if self._frame is None:
                take = min(HEADER.size - len(self._header), len(view) - at)
                self._header += view[at:at + take]
                at += take
                if len(self._header) < HEADER.size:
                    return frames
                (size,) = HEADER.unpack(self._header)
                if size > MAX_MESSAGE_BYTES:
                    raise FrameError(f"frame of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
                self._header.clear()
                self._frame, self._filled = bytearray(size), 0
            take = min(len(self._frame) - self._filled, len(view) - at)
            self._frame[self._filled:self._filled + take] = view[at:at + take]
            self._filled += take
            at += take
            if self._filled < len(self._frame):
                return frames
            frames.append(self._frame)
            self._frame = None


def read_frame(sock: socket.socket) -> bytes:
    """One frame from a blocking socket (its timeout applies to each read)."""
    (size,) = HEADER.unpack(_read_exactly(sock, HEADER.size))
    if size > MAX_MESSAGE_BYTES:
        raise FrameError(f"frame of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    view = memoryview(bytearray(size))
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise FrameError("connection closed by the peer")
        got += n
    return view.obj  # the bytearray itself: protobuf parses it without another copy


def server_context(tls: Tls) -> ssl.SSLContext:
    """The data plane's TLS on the expert side: the gRPC server's certificate, and client CA for mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        context.load_verify_locations(tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: Tls) -> ssl.SSLContext:
    """The router side: verify the expert against `ca`, present `cert`/`key` when set."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    if tls.cert:
        context.load_cert_chain(tls.cert, tls.key)
    return context
