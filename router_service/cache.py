"""The expert-output cache: an in-process LRU bounded in bytes, in front of Redis (DESIGN §5).

A key names one token row at one layer: the model revision, the layer, and a 128-bit xxh3 hash of
the row's exact bytes together with its chosen experts and gate weights. The value is that row's
combined expert output, as bytes in the serving dtype, exactly as the experts returned it.

Redis is optional and fail-open: a lookup that errors or times out, or a value of the wrong size,
counts as an error and the row is computed as usual. After an error the cache stops asking Redis for
a back-off period (doubling up to 5 s) so a dead or slow server costs at most one timeout per
period, logs one warning per outage, and reconnects by itself. Writes go to Redis from a background
thread, one scripted command with a TTL for what the layer steps queued meanwhile, off the critical path.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 120  # bytes per entry beyond the value: key string, dict slot, bytes object headers
MAX_WRITE_KEYS = 4096  # rows per write command, when queued layer steps are merged into one
MAX_BACKOFF_S = 5.0  # a dead Redis costs one failed attempt per this period; a revived one is used again soon


@dataclass
class CacheConfig:
    mode: str = "off"  # off | local | redis (local in front of Redis)
    redis_url: str | None = None
    ttl_s: int = 3600
    local_bytes: int = 256 << 20
    phases: str = "both"  # prefill | decode | both
    prefix: str = "moe"
    redis_timeout_s: float = 0.05

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def row_keys(head: str, records: memoryview, width: int) -> list[str]:
    """One key per record of `width` bytes (a row's input bytes, expert ids and gate weights side by side)."""
    digest = xxhash.xxh3_128_hexdigest
    return [head + digest(records[i:i + width]) for i in range(0, len(records), width)]


class LocalCache:
    """LRU of key -> value bytes, bounded by the bytes it holds (values plus a per-entry overhead)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        with self._lock:
            out = [self._entries.get(key) for key in keys]
            if out.count(None) < len(out):  # hits become the most recently used
                for key, value in zip(keys, out, strict=True):
                    if value is not None:
                        self._entries.move_to_end(key)
            return out

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        with self._lock:
            entries, held = self._entries, self.bytes
            for key, value in items:
                size = len(value) + ENTRY_OVERHEAD
                if size > self.max_bytes:
                    continue
                old = entries.pop(key, None)
                if old is not None:
                    held -= len(old) + ENTRY_OVERHEAD
                entries[key] = value
                held += size
            while held > self.max_bytes:  # oldest first, once the call's items are in
                _, evicted = entries.popitem(last=False)
                held -= len(evicted) + ENTRY_OVERHEAD
            self.bytes = held

    def __len__(self) -> int:
        return len(self._entries)


# One command for the writes queued meanwhile: SET with expiry for every key, run server-side. A
# pipeline of SETs costs redis-py a Python-level command build per row, on a thread that shares the GIL
# with the engine; this is one command, packed in one join (RedisCache._write, bench/RESULTS.md).
SET_ALL = """
for i, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
"""


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


class RedisCache:
    """Tier 2: one MGET per layer step for every local miss; one scripted SET-all per step from a writer thread."""

    def __init__(self, url: str, ttl_s: int, timeout_s: float, on_error: Callable[[], None] | None = None):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False)
        self.url, self.ttl_s = url, ttl_s
        self.on_error = on_error
        self._down_until = 0.0
        self._backoff = 0.5
        self._warned = False
        self._set_all = self.client.register_script(SET_ALL)
        self._no_script = redis.exceptions.NoScriptError
        self._writes: queue.Queue[list[tuple[str, bytes]] | None] = queue.Queue(maxsize=256)
        self._writer = threading.Thread(target=self._write_loop, name="redis-writer", daemon=True)
        self._writer.start()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def get_many(self, keys: list[str]) -> list[bytes | None] | None:
        """Values (None where absent), or None when Redis could not answer (counted as errors)."""
        if not self.available:
            return None
        try:
            values = self.client.mget(keys)
        except Exception as exc:
            self._failed(exc)
            return None
        self._recovered()
        return values

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        if items and self.available:
            with contextlib.suppress(queue.Full):  # Redis slower than we produce: drop; rows merely go uncached
                self._writes.put_nowait(items)

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            items = self._writes.get()
            taken = 1
            if items is None:
                break
            # what queued up meanwhile (the next layers' rows) goes in the same command
            while len(items) < MAX_WRITE_KEYS:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is None:
                    stopping = True
                    break
                items = items + more
            try:
                self._write(items)
            except Exception as exc:  # any failure of the cache must only cost the write
                self._failed(exc)
            finally:
                for _ in range(taken):
                    self._writes.task_done()

    def _write(self, items: list[tuple[str, bytes]]) -> None:
        """SET-all as one EVALSHA packed here. redis-py builds a command argument by argument in Python
        (2.2 ms of the writer's CPU for 512 rows, on the GIL the engine thread needs); one join costs 0.3 ms."""
        parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (4 + 2 * len(items), self._set_all.sha.encode()),
                 _bulk(str(len(items)).encode()), *(_bulk(key.encode()) for key, _ in items),
                 _bulk(str(self.ttl_s).encode())]
        for _, value in items:
            parts += (b"$%d\r\n" % len(value), value, b"\r\n")
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([b"".join(parts)])
            connection.read_response()
        except self._no_script:  # the server lost its scripts (restarted, flushed): redis-py loads it again
            self._set_all(keys=[key for key, _ in items], args=[self.ttl_s, *(value for _, value in items)])
        except BaseException:
            connection.disconnect()  # a half-read reply must not reach the next command
            raise
        finally:
            pool.release(connection)

    def flush(self) -> None:
        """Wait until every queued write has been sent (or failed)."""
        self._writes.join()

    def _failed(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("Redis cache at %s unavailable (%s); computing without it until it answers", self.url, exc)
            self._warned = True
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _recovered(self) -> None:
        if self._warned:
            log.warning("Redis cache at %s is back", self.url)
            self._warned = False
        self._backoff = 0.5

    def close(self) -> None:
        self._writes.put(None)
        self._writer.join(2)
        self.client.close()
