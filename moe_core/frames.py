"""The expert data plane's wire format: length-prefixed protobuf messages on a plain TCP (or TLS) stream.

The router's hot path sends one ExpertRequest per shard per layer step and waits for the ExpertResponse.
Over Python gRPC that exchange costs ≈ 0.7 ms on loopback (the bare stream floor is ≈ 0.52 ms, plus
the hand-offs between the engine thread, the asyncio loop and gRPC's poller); the same messages framed
on a socket the engine thread reads and writes itself cost ≈ 0.17 ms (bench/RESULTS.md, "Expert data
plane"). The messages are exactly the gRPC contract's; only the framing differs: a 4-byte little-endian
length, then the serialized message.

A message's big tensor (the hidden rows out, the output rows back) is written from the tensor's own
memory (`Outgoing`): the message goes out without that Tensor's `data`, followed by the same Tensor
field once more holding only `data`. Protobuf parsers merge repeated occurrences of a message field, so
the receiver parses exactly the message it would have got in one piece, and the sender skips the four
copies of building and serializing it (≈ 1 ms per 1.5 MB message; bench/RESULTS.md, sixteenth round).
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass

from google.protobuf.message import Message

from moe_core.pb import tensor_pb2
from moe_core.rpc import MAX_MESSAGE_BYTES, Tls

HEADER = struct.Struct("<I")
_DATA = tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number
_LENGTH_DELIMITED = 2  # protobuf's wire type of bytes and message fields


@dataclass(frozen=True)
class Outgoing:
    """A message to frame, and optionally the bytes of one of its Tensor fields kept apart (`raw`).

    `message`'s field `field` then holds that tensor's dtype and shape but no data."""

    message: Message
    field: str = ""
    raw: memoryview | None = None

    def whole(self) -> Message:
        """The message in one piece (for gRPC, which serializes it itself)."""
        if self.raw is None:
            return self.message
        whole = type(self.message)()
        whole.CopyFrom(self.message)
        getattr(whole, self.field).data = self.raw.tobytes()
        return whole

    def buffers(self) -> list[bytes | memoryview]:
        """The frame as buffers to write in order: the header and message, then the tensor's own memory."""
        head = self.message.SerializeToString()
        if self.raw is None:
            return [pack(head)]
        number = self.message.DESCRIPTOR.fields_by_name[self.field].number
        data_key = _varint(_DATA << 3 | _LENGTH_DELIMITED) + _varint(len(self.raw))
        field_key = _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(data_key) + len(self.raw))
        size = len(head) + len(field_key) + len(data_key) + len(self.raw)
        if size > MAX_MESSAGE_BYTES:
            raise FrameError(f"message of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        return [HEADER.pack(size) + head + field_key + data_key, self.raw]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def send(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """Write the buffers in order on a blocking socket, without joining them (its timeout applies)."""
    if isinstance(sock, ssl.SSLSocket):  # TLS sockets have no sendmsg; the record layer copies anyway
        sock.sendall(b"".join(buffers))
        return
    views = [memoryview(b) for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


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
