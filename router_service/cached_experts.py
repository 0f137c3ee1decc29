"""The expert backend behind the expert-output cache: look rows up, dispatch only the misses, remember.

Per layer step: keys for the rows of the cached phases, one pass over the local LRU, one MGET to Redis
for what it missed, then the remaining rows go to the real backend (one message per shard as always).
When their outputs come back the result is assembled in row order and the new rows are written to
both tiers. A hit is the exact bytes the experts returned when the row was first computed.

Rows with the same key in one step (a request and its repeat prefilled or decoding side by side, so
neither has been written yet) are looked up and computed once and shared: counted as result "shared".

Redis is asked about a row at a step's later layers only if it did not lack the row at the step's first
layer: a later layer's input row is a function of the earlier layers' rows of the same tokens, so a row
nobody stored at the first layer was not stored at the next ones either (short of eviction, which costs
a hit, never a wrong row). A step of new tokens then pays one Redis round trip instead of one per layer.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict

import numpy as np
import torch
import xxhash
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moe_core.forward import ExpertCall, ExpertHandle
from moe_core.metrics import LATENCY_BUCKETS
from router_service.cache import CacheConfig, LocalCache, RedisCache, row_keys
from router_service.expert_backend import ExpertBackend, WrappedBackend

log = logging.getLogger(__name__)

SMALL_ROWS = 16  # at most this many rows: keys hashed from Python lists. Between two layer steps the shards'
# compute evicts the router's caches, and each tensor call then costs several microseconds.
COLD_STEPS = 4  # steps whose first-layer Redis misses are kept (two overlapped micro-batches at most in flight)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry, local: LocalCache):
        self.requests = Counter("moe_expert_cache_requests", "Expert-output cache lookups by tier and result",
                                ["tier", "result"], registry=registry)
        self.lookup = Histogram("moe_expert_cache_lookup_duration_seconds", "Cache lookups of one layer step",
                                ["tier"], buckets=LATENCY_BUCKETS, registry=registry)
        self.bytes = Gauge("moe_expert_cache_bytes", "Bytes held by the cache", ["tier"], registry=registry)
        self.bytes.labels("local").set_function(lambda: local.bytes)
        self._children: dict[tuple[str, ...], Counter | Histogram] = {}  # labels() costs ~2 us a call

    def request(self, tier: str, result: str) -> Counter:
        child = self._children.get((tier, result))
        if child is None:
            child = self._children[(tier, result)] = self.requests.labels(tier, result)
        return child

    def lookup_of(self, tier: str) -> Histogram:
        child = self._children.get((tier,))
        if child is None:
            child = self._children[(tier,)] = self.lookup.labels(tier)
        return child


class CachedExperts(WrappedBackend):
    def __init__(self, inner: ExpertBackend, config: CacheConfig, revision: str,
                 registry: CollectorRegistry | None = None):
        super().__init__(inner)
        self.config, self.revision = config, revision
        # a repeat's rows must equal the first run's bit for bit to hit; decode rows also depend on the
        # prompt's keys and values, so caching them needs both phases invariant
        self.invariant_phases = frozenset({"prefill", "decode"} if config.phases != "prefill" else {"prefill"})
        self.local = LocalCache(config.local_bytes)
        self.redis = RedisCache(config.redis_url, config.ttl_s, config.redis_timeout_s) if config.mode == "redis" \
            else None
        self.metrics = CacheMetrics(registry, self.local) if registry is not None else None
        self.dispatched_rows = 0  # rows that went to the experts (for tests and benchmarks)
        self._cold: OrderedDict[int, set[int]] = OrderedDict()  # step id -> its rows Redis lacked at the first layer

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.submit(ExpertCall(layer, x, weights, ids)).result()

    def reserve(self, hidden_size: int, dtype: torch.dtype) -> None:
        """Take the local tier's whole budget now, for rows of this width (LocalCache.reserve)."""
        started = time.perf_counter()
        faulted = self.local.reserve(hidden_size * dtype.itemsize)
        log.info("expert cache: %d MiB for %d rows reserved in %.2fs%s", self.config.local_bytes >> 20,
                 self.local.capacity, time.perf_counter() - started, "" if faulted else " (pages fault in later)")

    def submit(self, call: ExpertCall) -> ExpertHandle:
        cached = self._cached_rows(call)
        if not cached:
            self.dispatched_rows += call.x.shape[0]
            return self.inner.submit(call)
        keys, rows = self._keys(call, cached), cached
        copies: dict[int, int] = {}  # row -> an earlier row of this step with the same key
        if len(set(keys)) < len(keys):  # the first row with a key looks it up (and computes it on a miss)
            first: dict[str, int] = {}
            for row, key in zip(rows, keys, strict=True):
                if key in first:
                    copies[row] = first[key]
                else:
                    first[key] = row
            self._count_result("local", "shared", len(copies))
            keys, rows = list(first), list(first.values())
        found, stored = self._lookup(call, keys, rows)
        n = call.x.shape[0]
        if not found and not copies:  # the usual step without repeats: all computed
            hit, misses, writes = [], list(range(n)), dict(zip(rows, keys, strict=True))
        else:
            hit = [rows[i] for i in found]
            held, found_at = set(hit), set(found)
            misses = [row for row in range(n) if row not in held and row not in copies]
            writes = {row: key for i, (row, key) in enumerate(zip(rows, keys, strict=True)) if i not in found_at}
        self.dispatched_rows += len(misses)
        handle = None
        if len(misses) == n:  # nothing found: send the step as it is, no gather
            handle = self.inner.submit(call)
        elif misses:
            index = torch.tensor(misses, device=call.x.device)
            handle = self.inner.submit(ExpertCall(call.layer, call.x[index], call.weights[index], call.ids[index],
                                                  num_decode=sum(1 for r in misses if r < call.num_decode),
                                                  request_ids=call.request_ids, step_id=call.step_id))
        return _Assembly(self, call.x, hit, stored, misses, handle, writes, copies)

    def _cached_rows(self, call: ExpertCall) -> list[int]:
        rows = call.x.shape[0]
        phases = self.config.phases
        decode = range(call.num_decode) if phases in ("decode", "both") else range(0)
        prefill = range(call.num_decode, rows) if phases in ("prefill", "both") else range(0)
        return [*decode, *prefill]

    def _keys(self, call: ExpertCall, rows: list[int]) -> list[str]:
        """One key per row: the hash of its input bytes, expert ids (int32) and gate weights (float32)."""
        head = f"{self.config.prefix}:{self.revision}:{call.layer}:"
        if len(rows) <= SMALL_ROWS:
            return _small_keys(head, call, rows)
        x, ids, weights = call.x, call.ids, call.weights
        if len(rows) < x.shape[0]:  # rows are in order, so all of them means no gather
            index = torch.tensor(rows, device=x.device)
            x, ids, weights = x[index], ids[index], weights[index]
        # the records joined by numpy: torch.cat over uint8 columns is ~10x slower
        records = np.concatenate([_bytes_of(x), _bytes_of(ids, np.int32), _bytes_of(weights, np.float32)], axis=1)
        return row_keys(head, memoryview(records).cast("B"), records.shape[1])

    def _lookup(self, call: ExpertCall, keys: list[str], rows: list[int]) -> tuple[list[int], np.ndarray]:
        """The positions in `keys` (the step's rows `rows`) that either tier holds, ascending, and their
        stored rows [found, row bytes] uint8 in that order."""
        started = time.perf_counter()
        found, stored = self.local.get_rows(keys)
        self._count_result("local", "hit", len(found))
        self._count_result("local", "miss", len(keys) - len(found))
        self._observe("local", started)
        if self.redis is None:
            return found, stored
        held = set(found)
        missing = [i for i in range(len(keys)) if i not in held]
        step_id = call.step_id
        cold = self._cold.get(step_id)
        first_layer = cold is None and step_id >= 0
        ask = missing if cold is None else [i for i in missing if rows[i] not in cold]
        if not ask:
            if first_layer:
                self._remember_cold(step_id, set())
            return found, stored
        started = time.perf_counter()
        answers = self.redis.get_many([keys[i] for i in ask])
        self._observe("redis", started)
        if answers is None:
            self._count_result("redis", "error", len(ask))
            return found, stored
        fresh, values, garbage = [], [], 0
        value_bytes = call.x.shape[1] * call.x.element_size()
        for i, value in zip(ask, answers, strict=True):
            if value is not None and len(value) != value_bytes:  # not something we wrote: count it, compute
                garbage += 1
            elif value is not None:
                fresh.append(i)
                values.append(value)
        if first_layer:
            self._remember_cold(step_id, {rows[i] for i, value in zip(ask, answers, strict=True) if value is None})
        self._count_result("redis", "hit", len(fresh))
        self._count_result("redis", "miss", len(ask) - len(fresh) - garbage)
        self._count_result("redis", "error", garbage)
        if not fresh:
            return found, stored
        got = np.frombuffer(bytearray(b"".join(values)), dtype=np.uint8).reshape(len(fresh), value_bytes)
        self.local.put_rows([keys[i] for i in fresh], got)
        if not found:
            return fresh, got
        merged = found + fresh
        order = sorted(range(len(merged)), key=merged.__getitem__)
        return [merged[i] for i in order], np.concatenate([stored, got])[order]

    def _remember_cold(self, step_id: int, rows: set[int]) -> None:
        self._cold[step_id] = rows
        while len(self._cold) > COLD_STEPS:
            self._cold.popitem(last=False)

    def _count_result(self, tier: str, result: str, n: int) -> None:
        if self.metrics and n:
            self.metrics.request(tier, result).inc(n)

    def _observe(self, tier: str, started: float) -> None:
        if self.metrics:
            self.metrics.lookup_of(tier).observe(time.perf_counter() - started)

    def remember(self, keys: list[str], rows: np.ndarray) -> None:
        """Store computed rows ([n, row bytes] uint8, row i under keys[i]) in both tiers."""
        self.local.put_rows(keys, rows)
        if self.redis is not None:  # the writer thread reads them later: its own copy
            self.redis.put_rows(keys, rows if rows.flags.owndata else rows.copy())

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        self.inner.close()


class _Assembly:
    """The step's output in row order: cached rows from their stored bytes, the rest from the experts."""

    def __init__(self, cache: CachedExperts, x: torch.Tensor, hit: list[int], stored: np.ndarray,
                 misses: list[int], handle: ExpertHandle | None, writes: dict[int, str], copies: dict[int, int]):
        self.cache, self.x, self.hit, self.stored, self.misses = cache, x, hit, stored, misses
        self.handle, self.writes, self.copies = handle, writes, copies

    def result(self) -> torch.Tensor:
        x = self.x
        if len(self.misses) == x.shape[0]:  # every row computed, in order
            computed = self.handle.result()
            self._remember(computed)
            return computed
        stored = None
        if self.hit:
            stored = torch.from_numpy(self.stored).view(x.dtype).view(len(self.hit), x.shape[1]).to(x.device)
            if len(self.hit) == x.shape[0]:  # every row a hit (a repeat decoding alone): already in row order
                return stored
        out = torch.empty_like(x)
        if stored is not None:
            out[torch.tensor(self.hit, device=x.device)] = stored
        if self.handle is not None:
            computed = self.handle.result()
            out[torch.tensor(self.misses, device=x.device)] = computed
            self._remember(computed)
        if self.copies:
            out[torch.tensor(list(self.copies), device=x.device)] = \
                out[torch.tensor(list(self.copies.values()), device=x.device)]
        return out

    def _remember(self, computed: torch.Tensor) -> None:
        if not self.writes:
            return
        data = _bytes_of(computed)  # [misses, row bytes], over the output's own memory
        if len(self.misses) == self.x.shape[0]:  # row i of the output is row i of the step
            index = list(self.writes)
        else:
            position = {row: i for i, row in enumerate(self.misses)}
            index = [position[row] for row in self.writes]
        rows = data if len(index) == len(data) else data[index]  # ascending and distinct: all rows means every one
        self.cache.remember(list(self.writes.values()), rows)


def _small_keys(head: str, call: ExpertCall, rows: list[int]) -> list[str]:
    """The keys of a few rows (a decode step), the same as the batched way's, with few tensor calls."""
    x = _rows_of(call.x)
    ids, weights = call.ids.tolist(), call.weights.tolist()
    k = len(ids[0])
    pack = struct.Struct(f"<{k}i{k}f").pack  # int32 ids and float32 weights, little-endian as in the records
    keys = []
    for row in rows:
        digest = xxhash.xxh3_128(x[row])
        digest.update(pack(*ids[row], *weights[row]))
        keys.append(head + digest.hexdigest())
    return keys


def _rows_of(t: torch.Tensor) -> np.ndarray:
    """A numpy array over a tensor's memory whose row i holds row i's bytes, with as few tensor calls as can be."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are what count
        t = t.view(torch.int16)
    try:
        a = t.numpy()
    except TypeError:  # on an accelerator
        a = t.cpu().numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _bytes_of(t: torch.Tensor, as_type: type | None = None) -> np.ndarray:
    """[rows, ...] tensor -> [rows, bytes per row] uint8 array (converted to `as_type` first)."""
    a = _rows_of(t)
    if as_type is not None:
        a = a.astype(as_type, copy=False)
    return a.reshape(a.shape[0], -1).view(np.uint8)
