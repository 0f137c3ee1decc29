"""The expert-output cache: an in-process LRU bounded in bytes, in front of Redis (DESIGN §5).

A key names one token row at one layer: the model revision, the layer, and a 128-bit xxh3 hash of
the row's exact bytes together with its chosen experts and gate weights (router_service/row_keys.py).
The value is that row's combined expert output, as bytes in the serving dtype, exactly as the experts
returned it. In Redis a token's rows of every MoE layer share one value, under its first layer's key
(cache_bundles.py).

Redis is optional and fail-open: a lookup that errors or times out, or a value not in our format,
counts as an error and the row is computed as usual. After an error the cache stops asking Redis for
a back-off period (doubling up to 5 s) so a dead or slow server costs at most one timeout per
period, logs one warning per outage, and reconnects by itself. Writes go to Redis from a background
thread, pipelined SETs with a TTL for what the steps queued meanwhile, off the critical path, on a
connection of their own that waits longer than a lookup may.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from router_service.row_keys import SlotIndex, StepKeys, lookup_step

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 120  # bytes per entry beyond its row: its index entry (≈ 44 native, ≈ 120 in Python)
MAX_WRITE_KEYS = 4096  # values per write command, when queued steps are merged into one
MAX_BACKOFF_S = 5.0  # a dead Redis costs one failed attempt per this period; a revived one is used again soon
WRITE_TIMEOUT_S = 2.0  # the writer thread's socket timeout (lookups keep the configured, tight one)
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in as if written, its contents unchanged


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


def populate(a: np.ndarray) -> bool:
    """Fault the pages under `a` in now, so that writing them later costs no page fault; False where the
    kernel cannot (before Linux 5.14, or not Linux): the pages then fault in as they are first written."""
    page = mmap.PAGESIZE
    start = -(-a.ctypes.data // page) * page
    end = (a.ctypes.data + a.nbytes) // page * page
    if sys.platform != "linux" or end <= start:
        return False
    madvise = ctypes.CDLL(None, use_errno=True).madvise  # a ctypes call releases the GIL meanwhile
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(start, end - start, MADV_POPULATE_WRITE) == 0


class LocalCache:
    """LRU of (layer, digest) -> one row's bytes, bounded by the bytes it holds (rows plus a per-entry overhead).

    Every row of one cache has the same width (a layer's output row in the serving dtype), so the rows
    live in one slab of fixed slots, made by `reserve` (the router, at start) or else at the first store;
    an evicted entry's slot takes the next row. A layer step's rows go in with one copy and come out with
    one gather, and the index from keys to slots (router_service/row_keys.py) takes one native call per
    step: no Python work per row (bench/RESULTS.md, "The expert cache's local tier in one call per step")."""

    def __init__(self, max_bytes: int, use_native: bool = True):
        self.max_bytes = max_bytes
        self.width = 0  # bytes per row, fixed by the first store
        self._use_native = use_native
        self._slab: np.ndarray | None = None  # [slots, width] uint8
        self._index: SlotIndex | None = None  # made with the slab
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Rows the slab holds (0 before it is made)."""
        return 0 if self._slab is None else len(self._slab)

    @property
    def native(self) -> bool:
        return self._index is not None and self._index.native

    @property
    def bytes(self) -> int:
        return len(self) * (self.width + ENTRY_OVERHEAD)

    def __len__(self) -> int:
        index = self._index
        return 0 if index is None else len(index)

    def reserve(self, width: int) -> bool:
        """Make the slab for rows of `width` bytes now and fault its memory in (see `populate`): the cache
        then holds its whole budget from the start, and storing a row never waits for a page fault (on this
        project's VMs ≈ 10 µs per 4 KiB page, 2.6 µs per 1 KiB row; bench/RESULTS.md, "Where the expert
        cache's cost goes without repeats"). Without it the slab is made at the first store and its pages
        fault in as rows arrive."""
        with self._lock:
            if self._slab is None:
                self._make_slab(width)
            elif width != self.width:
                raise ValueError(f"rows of {width} bytes in a cache of {self.width}-byte rows")
            return populate(self._slab)

    def _make_slab(self, width: int) -> None:
        self.width = width
        self._slab = np.empty((self.max_bytes // (width + ENTRY_OVERHEAD), width), dtype=np.uint8)
        self._index = SlotIndex(len(self._slab), self._use_native)

    def get_rows(self, layer: int, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The positions in `digests` ([n, 16]) held at `layer`, ascending, and a copy of their rows
        [found, width] in that order. Hits become the most recently used."""
        with self._lock:
            if self._index is None or not len(digests):
                return np.empty(0, dtype=np.int64), np.empty((0, self.width), dtype=np.uint8)
            slots = self._index.get(layer, digests)
            found = np.flatnonzero(slots >= 0)
            return found, self._slab[slots[found]]  # a gather: a copy later stores cannot touch

    def lookup_step(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, start: int,
                    stop: int) -> tuple[StepKeys, np.ndarray]:
        """The keys of a layer step's rows start..stop-1 (row_keys.lookup_step), and a copy of the rows held
        [keys.held, width], in position order. Hits become the most recently used."""
        with self._lock:
            keys = lookup_step(self._index, layer, x, ids, weights, start, stop)
            if not keys.held:
                return keys, np.empty((0, self.width), dtype=np.uint8)
            held = keys.slots if keys.held == len(keys.slots) else keys.slots[keys.slots >= 0]
            return keys, self._slab[held]

    def put_rows(self, layer: int, digests: np.ndarray, rows: np.ndarray) -> None:
        """Store row i of `rows` ([n, width] uint8) under (layer, digests[i]); the oldest entries make room."""
        if not len(digests):
            return
        if rows.ndim != 2 or len(rows) != len(digests) or rows.dtype != np.uint8:
            raise ValueError(f"{len(digests)} keys need a [{len(digests)}, width] uint8 array, got {rows.dtype} "
                             f"{rows.shape}")
        if rows.strides[1] != 1:
            rows = np.ascontiguousarray(rows)
        self._store(layer, digests, rows, rows.ctypes.data, rows.strides[0], rows.shape[1], None)

    def put_output(self, layer: int, digests: np.ndarray, out: torch.Tensor, pick: np.ndarray | None = None) -> None:
        """Store row pick[i] (or i) of the expert output `out` [T, H] under (layer, digests[i]), copied
        from the tensor's own memory."""
        if not len(digests):
            return
        if out.device.type != "cpu" or out.stride(-1) != 1:
            rows = bytes_of(out)
            self.put_rows(layer, digests, rows if pick is None else rows[pick])
            return
        width = out.shape[1] * out.element_size()
        self._store(layer, digests, out, out.data_ptr(), out.stride(0) * out.element_size(), width, pick)

    def _store(self, layer: int, digests: np.ndarray, rows: np.ndarray | torch.Tensor, rows_at: int,
               row_stride: int, width: int, pick: np.ndarray | None) -> None:
        with self._lock:
            if self._slab is None:
                self._make_slab(width)
            elif width != self.width:
                raise ValueError(f"rows of {width} bytes in a cache of {self.width}-byte rows")
            if len(self._slab) == 0:
                return
            # Keys of one call evict each other only when there are more than the cache holds: then the
            # last ones stay, each slot with its own key's row.
            if self._index.native:
                self._index.store(layer, digests, rows_at, row_stride, pick, self._slab)
                return
            if isinstance(rows, torch.Tensor):
                rows = bytes_of(rows)
            self._slab[self._index.put(layer, digests)] = rows if pick is None else rows[pick]


def bytes_of(t: torch.Tensor) -> np.ndarray:
    """[rows, ...] tensor -> [rows, bytes per row] uint8 array over its memory (a copy only off the CPU)."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are what count
        t = t.view(torch.int16)
    try:
        a = t.numpy()
    except TypeError:  # on an accelerator
        a = t.cpu().numpy()
    a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    return a.reshape(a.shape[0], -1).view(np.uint8)


# Writes go as plain pipelined SETs with expiry between these two, in one packed write: the server
# sends no reply per SET, so the writer reads one reply (to turning replies back on) however many rows
# it wrote. A failed SET only leaves its row uncached.
REPLIES_OFF = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n"
REPLIES_ON = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$2\r\nON\r\n"


def set_commands(keys: list[str], rows: np.ndarray, ttl_s: int) -> list[memoryview]:
    """`SET key row EX ttl` for every row, as RESP bytes. Keys of one length are framed together by numpy
    (the router's keys are all its first MoE layer's, of one length, so all of them at once): no Python per row."""
    width, ttl = rows.shape[1], str(ttl_s).encode()
    value_head = np.frombuffer(b"\r\n$%d\r\n" % width, dtype=np.uint8)
    tail = np.frombuffer(b"\r\n$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl), dtype=np.uint8)
    joined = "".join(keys).encode()
    if len({len(key) for key in keys}) == 1 and len(joined) == len(keys) * len(keys[0]):  # one length, ASCII
        groups = [(joined, rows)]
    else:
        encoded = [key.encode() for key in keys]
        by_length: dict[int, list[int]] = {}
        for i, key in enumerate(encoded):
            by_length.setdefault(len(key), []).append(i)
        groups = [(b"".join(encoded[i] for i in picked), rows[picked]) for _, picked in sorted(by_length.items())]
    out = []
    for key_bytes, values in groups:
        n = len(values)
        length = len(key_bytes) // n
        key_head = np.frombuffer(b"*5\r\n$3\r\nSET\r\n$%d\r\n" % length, dtype=np.uint8)
        parts = (key_head, np.frombuffer(key_bytes, dtype=np.uint8).reshape(n, length), value_head, values, tail)
        frames = np.empty((n, sum(part.shape[-1] for part in parts)), dtype=np.uint8)
        at = 0
        for part in parts:
            frames[:, at:at + part.shape[-1]] = part
            at += part.shape[-1]
        out.append(frames.data)  # sent as it is: no copy into bytes
    return out


class RedisCache:
    """Tier 2: one MGET per step for the local misses; pipelined SETs from a writer thread."""

    def __init__(self, url: str, ttl_s: int, timeout_s: float, on_error: Callable[[], None] | None = None):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False)
        # The writer is off the serving path and sends a step's values in one command (tens of MB for a long
        # prefill in float32): it waits longer than a lookup may, or a large write would put lookups into
        # the back-off of a Redis that is merely busy.
        self.writer_client = redis.Redis.from_url(url, socket_timeout=max(timeout_s, WRITE_TIMEOUT_S),
                                                  socket_connect_timeout=timeout_s, retry_on_timeout=False)
        self.url, self.ttl_s = url, ttl_s
        self.on_error = on_error
        self._down_until = 0.0
        self._backoff = 0.5
        self._warned = False
        self._writes: queue.Queue[tuple[list[str], np.ndarray] | None] = queue.Queue(maxsize=256)
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

    def put_rows(self, keys: list[str], rows: np.ndarray) -> None:
        """Queue row i of `rows` ([n, width] uint8, not changed afterwards) for keys[i]; the writer thread
        turns them into the command, off the caller's path."""
        if keys and self.available:
            with contextlib.suppress(queue.Full):  # Redis slower than we produce: drop; rows merely go uncached
                self._writes.put_nowait((keys, rows))

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = self._writes.get()
            taken = 1
            if batch is None:
                break
            keys, rows = list(batch[0]), [batch[1]]
            # what queued up meanwhile (the next steps' values) goes in the same command
            while len(keys) < MAX_WRITE_KEYS:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is None:
                    stopping = True
                    break
                keys += more[0]
                rows.append(more[1])
            try:
                self._write(keys, np.concatenate(rows) if len(rows) > 1 else rows[0])
            except Exception as exc:  # any failure of the cache must only cost the write
                self._failed(exc)
            finally:
                for _ in range(taken):
                    self._writes.task_done()

    def _write(self, keys: list[str], rows: np.ndarray) -> None:
        """Every row's SET with expiry, packed here (redis-py builds a command argument by argument in
        Python, on the GIL the engine thread needs) and sent with the server's replies off."""
        pool = self.writer_client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([REPLIES_OFF, *set_commands(keys, rows, self.ttl_s), REPLIES_ON])
            reply = connection.read_response()
            if reply not in (b"OK", "OK"):
                raise ValueError(f"CLIENT REPLY ON answered {reply!r}")
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
        self.writer_client.close()
