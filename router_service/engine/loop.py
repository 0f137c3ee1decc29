"""The engine on its own thread, with per-request streams for sync and asyncio callers.

Torch releases the GIL inside its kernels, so a step running here leaves the event loop of a
server free to accept and stream. Requests and aborts are handed over under a lock; outputs go
back through a per-request queue (a `queue.Queue` or an asyncio queue fed thread-safely).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from moe_core.errors import MoeServeError
from moe_core.threads import use_threads
from router_service.engine.engine import Engine, RequestOutput
from router_service.engine.params import SamplingParams

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine, threads: int | None = None):
        """`threads`: torch intra-op threads for the engine thread (None: leave torch's setting alone)."""
        self.engine, self.threads = engine, threads
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._aborts: list[str] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._sinks)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- submitting -------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[RequestOutput], None],
               request_id: str | None = None) -> str:
        """Queue a request whose outputs go to `sink` (called on the engine thread); raises on bad input."""
        with self._lock:
            if self._stopping:
                raise MoeServeError("the engine is shutting down")
            request_id = self.engine.add_request(prompt_ids, params, request_id)
            self._sinks[request_id] = sink
            self._wake.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
               ) -> Iterator[RequestOutput]:
        """Blocking iterator over one request's outputs; closing it early aborts the request."""
        outputs: queue.Queue[RequestOutput] = queue.Queue()
        request_id = self.submit(prompt_ids, params, outputs.put, request_id)
        finished = False
        try:
            while not finished:
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    async def astream(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
                      ) -> AsyncIterator[RequestOutput]:
        """Async iterator over one request's outputs; cancelling the consumer aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = self.submit(prompt_ids, params, lambda o: loop.call_soon_threadsafe(outputs.put_nowait, o),
                                 request_id)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            use_threads(self.threads)
        while True:
            with self._lock:
                self._apply_aborts()
                while not self._stopping and not self.engine.has_unfinished():
                    self._wake.wait()
                    self._apply_aborts()
                if self._stopping:
                    self._fail_all("the engine is shutting down")
                    return
            try:
                outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed")
                with self._lock:
                    self._fail_all("internal engine error")
                continue
            self._deliver(outputs)
            if self.engine.last_step_tokens == 0:  # work queued but none schedulable: do not spin
                with self._lock:
                    self._wake.wait(0.01)

    def _apply_aborts(self) -> None:
        for request_id in self._aborts:
            self.engine.abort(request_id)
            self._sinks.pop(request_id, None)
        self._aborts.clear()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            sinks = [(self._sinks.get(o.request_id), o) for o in outputs]
            for out in outputs:
                if out.finished:
                    self._sinks.pop(out.request_id, None)
        for sink, out in sinks:
            if sink is not None:
                sink(out)

    def _fail_all(self, message: str) -> None:
        for request_id, sink in list(self._sinks.items()):
            out = self.engine.abort(request_id) or RequestOutput(request_id, finished=True)
            out.finish_reason, out.error, out.error_code = "error", message, "unavailable"
            sink(out)
        self._sinks.clear()
