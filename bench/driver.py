"""Drive an OpenAI-compatible server and measure what a user sees.

Two ways to load it: a fixed number of requests in flight (`run_load`, a closed loop: each reply lets
the next request go), or requests sent at seeded arrival times whatever is in flight (`run_open_loop`,
an open loop, as users arrive), optionally capped at a number in flight.

Every request streams (`stream_options.include_usage`), so time to first token (TTFT), the gaps
between streamed chunks (ITL), time per output token (TPOT) and end-to-end latency are measured
from the client's side of the socket.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx

from bench.workload import Request


@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    repeat: bool = False  # the request repeats an earlier prompt of the workload
    choices: int = 1  # completions in the request (n); output_tokens counts them all
    sent: float = 0.0  # when the request went out, seconds from the start of its level
    late: float = 0.0  # open loop: how long after its arrival time it went out (client busy, or the cap)

    @property
    def tpot(self) -> float | None:
        per_choice = self.output_tokens / self.choices
        return (self.e2e - self.ttft) / (per_choice - 1) if per_choice > 1 else None


async def _one(client: httpx.AsyncClient, base_url: str, model: str, request: Request, choices: int = 1) -> Result:
    body = {"model": model, "prompt": request.prompt_ids, "max_tokens": request.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if choices > 1:
        body["n"] = choices
    result, started, last = Result(repeat=request.repeat, choices=choices), time.perf_counter(), None
    result.sent = started
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "error")
                now = time.perf_counter()
                if event.get("choices") and event["choices"][0].get("text"):
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e = time.perf_counter() - started
    return result


def _client(in_flight: int) -> httpx.AsyncClient:
    """A client with a connection for each request in flight (and a few spare)."""
    limits = httpx.Limits(max_connections=in_flight + 4, max_keepalive_connections=in_flight + 4)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)


async def run_load(base_url: str, model: str, requests: list[Request], concurrency: int,
                   progress=None, choices: int = 1) -> tuple[list[Result], float]:
    """Send `requests` keeping `concurrency` in flight, each asking for `choices` completions;
    -> per-request results and the wall time."""
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    results: list[Result] = []
    async with _client(concurrency) as client:
        async def worker() -> None:
            while not queue.empty():
                request = queue.get_nowait()
                result = await _one(client, base_url, model, request, choices)
                result.sent -= started
                results.append(result)
                if progress is not None:
                    progress.update(1)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


async def run_open_loop(base_url: str, model: str, requests: list[Request], arrivals: list[float],
                        max_concurrency: int | None = None, progress=None, choices: int = 1
                        ) -> tuple[list[Result], float]:
    """Send request i at `arrivals[i]` seconds from the start whether or not earlier ones have answered
    (at most `max_concurrency` in flight when set: the others wait their turn, and that wait counts as
    late); -> per-request results in request order and the wall time, first send to last reply."""
    if len(arrivals) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
    cap = max_concurrency or len(requests)  # no cap: room for every request at once
    gate = asyncio.Semaphore(cap)
    async with _client(cap) as client:
        started = time.perf_counter()

        async def send(request: Request, due: float) -> Result:
            async with gate:
                result = await _one(client, base_url, model, request, choices)
            result.sent -= started
            result.late = max(0.0, result.sent - due)
            if progress is not None:
                progress.update(1)
            return result

        tasks = []
        for request, due in zip(requests, arrivals, strict=True):
            delay = started + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(request, due)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - started


def percentiles(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 2)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": round(statistics.fmean(values) * scale, 2)}


def in_flight(results: list[Result], wall: float) -> dict[str, float]:
    """Requests in flight over the level: the time mean (sum of E2E over the wall time) and the most at once."""
    # (time, -1) sorts before (time, +1): a reply before a send at the same instant
    events = sorted([(r.sent, 1) for r in results] + [(r.sent + r.e2e, -1) for r in results])
    now = most = 0
    for _, change in events:
        now += change
        most = max(most, now)
    return {"mean": round(sum(r.e2e for r in results) / wall, 2) if wall else 0.0, "max": most}


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 2),
        "output_tokens": tokens, "output_tok_s": round(tokens / wall, 1), "req_s": round(len(ok) / wall, 3),
        "in_flight": in_flight(results, wall),
        "ttft_ms": percentiles([r.ttft for r in ok]), "tpot_ms": percentiles([r.tpot for r in ok if r.tpot]),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl]), "e2e_ms": percentiles([r.e2e for r in ok]),
        "first_error": next((r.error for r in results if r.error), None),
        # what a repeated prompt's user sees beside a new prompt's (workloads with repeats)
        **({"ttft_repeat_ms": percentiles([r.ttft for r in ok if r.repeat]),
            "ttft_fresh_ms": percentiles([r.ttft for r in ok if not r.repeat])}
           if any(r.repeat for r in ok) else {}),
    }
