"""`python -m gateway` on SIGTERM: /readyz turns 503 at once, requests in flight finish, then it exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.unit.gateway_fakes import SLOW_CHUNK_S, Harness

REPO = Path(__file__).resolve().parents[2]
PROMPT = "#slow Tell me a story about a lighthouse keeper"


@pytest.fixture(scope="module")
def router(demo_model):
    """A fake router (the harness's in-process gateway goes unused)."""
    with Harness(demo_model) as h:
        yield h


def start_gateway(model: Path, router: str, ready: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "gateway", "--model", str(model), "--router", router, "--port", "0",
            "--ready-file", str(ready), "--model-name", "demo", "--log-format", "json", *flags]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{json.loads(ready.read_text())['port']}"


class Stream(threading.Thread):
    """A streaming completion read in the background; `first` is set at its first event."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.first = threading.Event()
        self.events: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=30) as response:
                for line in response.iter_lines():
                    if line:
                        self.events.append(line)
                        self.first.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.first.set()


def wait_until(condition, timeout: float, step: float = 0.02) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout
        time.sleep(step)
    return time.monotonic() - started


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.TransportError:
        return True
    return False


def test_sigterm_drains_in_flight_streams_then_exits_0(demo_model, router: Harness, tmp_path: Path):
    grace, tokens = 1.0, 40
    proc, url = start_gateway(demo_model, router.settings.router[-1], tmp_path / "ready.json",
                              "--drain-grace-s", str(grace), "--drain-timeout-s", "20")
    try:
        assert httpx.get(f"{url}/readyz").status_code == 200
        stream = Stream(url, {"model": "demo", "prompt": PROMPT, "max_tokens": tokens, "stream": True})
        stream.start()
        assert stream.first.wait(10) and stream.error is None
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        assert wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout=0.5) < 0.5
        draining = httpx.get(f"{url}/readyz")
        assert draining.json() == {"status": "draining"} and draining.headers["connection"] == "close"
        # Within the grace period new requests are still served.
        late = httpx.post(f"{url}/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 2})
        assert late.status_code == 200 and late.json()["usage"]["completion_tokens"] == 2
        # After it, nothing new is accepted, while the stream still runs.
        time.sleep(max(0.0, signalled + grace + 0.8 - time.monotonic()))
        assert refused(url) and stream.is_alive()

        stream.join(tokens * SLOW_CHUNK_S + 10)
        assert stream.error is None and stream.events[-1] == "data: [DONE]"
        chunks = [json.loads(event[len("data: "):]) for event in stream.events[:-1]]
        assert all("error" not in chunk for chunk in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for chunk in chunks if chunk["choices"][0]["text"]) >= tokens - 1
        assert proc.wait(5) == 0
        assert time.monotonic() - signalled < grace + tokens * SLOW_CHUNK_S + 5
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read() if proc.stdout else ""
    lines = [json.loads(line) for line in output.splitlines()]  # --log-format json: every line is JSON
    assert any("draining" in line["msg"] for line in lines)
    assert "lighthouse" not in output  # no prompt text in the logs
    assert not (tmp_path / "ready.json").exists()


def test_requests_still_running_at_the_drain_timeout_are_cut_and_it_exits_0(demo_model, router: Harness,
                                                                              tmp_path: Path):
    proc, url = start_gateway(demo_model, router.settings.router[-1], tmp_path / "ready.json",
                              "--drain-grace-s", "0.2", "--drain-timeout-s", "1")
    try:
        stream = Stream(url, {"model": "demo", "prompt": "#hang1", "max_tokens": 8, "stream": True})
        stream.start()
        assert stream.first.wait(10)
        router.fake.cancel_seen.clear()
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proc.wait(10) == 0
        assert time.monotonic() - signalled < 0.2 + 1 + 2
        assert router.fake.cancel_seen.wait(5)  # the router was told to stop
        stream.join(5)
        assert "data: [DONE]" not in stream.events
    finally:
        if proc.poll() is None:
            proc.kill()
