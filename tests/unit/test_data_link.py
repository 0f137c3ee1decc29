"""The router's data link: replies matched to their steps, timeouts, and an abort that wakes a blocked read."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest

from moe_core import frames
from moe_core.pb import expert_pb2
from router_service.data_link import DataLink, data_address
from router_service.replica import ReplicaError


@pytest.fixture
def peer():
    """A listening socket; the test plays the expert service on the connection it accepts."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    yield listener, accepted
    for conn in accepted:
        conn.close()
    listener.close()


def accept(listener, accepted) -> socket.socket:
    conn, _ = listener.accept()
    accepted.append(conn)
    return conn


def reply(conn: socket.socket, step_id: int) -> None:
    conn.sendall(frames.pack(expert_pb2.ExpertResponse(step_id=step_id, compute_seconds=step_id).SerializeToString()))


def test_replies_are_matched_to_their_steps(peer):
    listener, accepted = peer
    link = DataLink("127.0.0.1", listener.getsockname()[1], timeout_s=10)
    link.send(expert_pb2.ExpertRequest(step_id=1))
    link.send(expert_pb2.ExpertRequest(step_id=2))
    conn = accept(listener, accepted)
    got = [expert_pb2.ExpertRequest.FromString(frames.read_frame(conn)).step_id for _ in range(2)]
    assert got == [1, 2]
    reply(conn, 2)
    reply(conn, 1)
    assert link.receive(1).step_id == 1  # reads step 2's reply first and keeps it
    assert link.receive(2).compute_seconds == 2
    link.close()


def test_a_slow_reply_is_a_deadline_and_the_link_is_done(peer):
    listener, accepted = peer
    link = DataLink("127.0.0.1", listener.getsockname()[1], timeout_s=0.05)
    link.send(expert_pb2.ExpertRequest(step_id=5))
    accept(listener, accepted)
    with pytest.raises(ReplicaError) as info:
        link.receive(5)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.retryable
    assert link.broken
    with pytest.raises(ReplicaError):
        link.send(expert_pb2.ExpertRequest(step_id=6))


def test_abort_from_another_thread_wakes_a_blocked_read(peer):
    listener, accepted = peer
    link = DataLink("127.0.0.1", listener.getsockname()[1], timeout_s=60)
    link.send(expert_pb2.ExpertRequest(step_id=1))
    accept(listener, accepted)
    errors: list[ReplicaError] = []

    def read() -> None:
        try:
            link.receive(1)
        except ReplicaError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    link.abort()
    reader.join(timeout=10)
    assert not reader.is_alive(), "abort did not wake the read"
    assert errors and errors[0].code == grpc.StatusCode.UNAVAILABLE


def test_nothing_listening_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        link = DataLink("127.0.0.1", port, timeout_s=5)
        with pytest.raises(ReplicaError) as info:
            link.send(expert_pb2.ExpertRequest(step_id=1))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_data_plane_lives_on_the_grpc_host():
    assert data_address("10.0.0.5:50051", 50052) == ("10.0.0.5", 50052)
    assert data_address("[::1]:50051", 7) == ("::1", 7)
