"""Ports for processes that bind later are drawn outside the kernel's ephemeral (outgoing) range."""

from __future__ import annotations

import socket

from moe_serve import ports


def test_port_below_the_ephemeral_range_and_free(tmp_path, monkeypatch):
    rng = tmp_path / "range"
    rng.write_text("32768\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", rng)
    for _ in range(20):
        port = ports.free_port()
        assert ports.LOWEST <= port < 32768 or port > 60999
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nothing holds it


def test_taken_ports_are_skipped(tmp_path, monkeypatch):
    rng = tmp_path / "range"
    rng.write_text(f"{ports.LOWEST + 2} 65535\n")  # room for two candidates only
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", rng)
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports.LOWEST))
        held.listen()
        for _ in range(10):
            assert ports.free_port() != ports.LOWEST


def test_whole_range_ephemeral_falls_back_to_the_kernel(tmp_path, monkeypatch):
    rng = tmp_path / "range"
    rng.write_text("1024 65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", rng)
    port = ports.free_port()
    assert 1024 <= port <= 65535 and ports.bindable(port)


def test_unreadable_range_assumes_the_linux_default(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)
