"""The expert backend behind the expert-output cache: look rows up, dispatch only the misses, remember.

Per layer step: keys for the rows of the cached phases, one pass over the local LRU, then the remaining
rows go to the real backend (one message per shard as always). When their outputs come back the result
is assembled in row order and the new rows are stored in the local tier. A hit is the exact bytes the
experts returned when the row was first computed.

Redis is asked once per step, at its first MoE layer, with one MGET for the rows the local tier lacks.
Its values hold a token's rows of every MoE layer (router_service/cache_bundles.py): a hit puts them all
into the local tier, where the later layers find them by their own keys. A row that Redis lacked at the
first layer is not asked about again at the later ones: a later layer's input row is a function of the
earlier layers' rows of the same tokens, so nobody stored it there either. The rows no tier held are
written to Redis once the step's last MoE layer is done, one value per token.

Rows with the same key in one step (a request and its repeat prefilled or decoding side by side, so
neither has been written yet) are looked up and computed once and shared: counted as result "shared".
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import xxhash
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moe_core.forward import ExpertCall, ExpertHandle
from moe_core.metrics import LATENCY_BUCKETS
from router_service.cache import CacheConfig, LocalCache, RedisCache, row_keys
from router_service.cache_bundles import BundleFormat, StepBundles
from router_service.expert_backend import ExpertBackend, WrappedBackend

log = logging.getLogger(__name__)

SMALL_ROWS = 16  # at most this many rows: keys hashed from Python lists. Between two layer steps the shards'
# compute evicts the router's caches, and each tensor call then costs several microseconds.
GATHERING_STEPS = 4  # steps whose Redis values are being gathered (two overlapped micro-batches at most in flight;
# a step that failed halfway is dropped when newer ones arrive)


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
                 registry: CollectorRegistry | None = None, moe_layers: Sequence[int] = ()):
        super().__init__(inner)
        if config.mode == "redis" and not moe_layers:
            raise ValueError("the Redis tier needs the model's MoE layers: a value holds a token's rows of all of them")
        self.moe_layers = tuple(moe_layers)  # in the order a step calls them
        self.config, self.revision = config, revision
        # a repeat's rows must equal the first run's bit for bit to hit; decode rows also depend on the
        # prompt's keys and values, so caching them needs both phases invariant
        self.invariant_phases = frozenset({"prefill", "decode"} if config.phases != "prefill" else {"prefill"})
        self.local = LocalCache(config.local_bytes)
        self.redis = RedisCache(config.redis_url, config.ttl_s, config.redis_timeout_s) if config.mode == "redis" \
            else None
        self.metrics = CacheMetrics(registry, self.local) if registry is not None else None
        self.dispatched_rows = 0  # rows that went to the experts (for tests and benchmarks)
        self._form: BundleFormat | None = None  # made for the first row width seen
        self._gathering: OrderedDict[int, StepBundles] = OrderedDict()  # step id -> its values for Redis

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
        step_keys = keys  # aligned with `cached`, which is one run of rows: row r has key step_keys[r - cached[0]]
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
        first_layer = self.redis is not None and call.layer == self.moe_layers[0]
        found, stored = self._lookup(call, keys, first_layer)
        n = call.x.shape[0]
        if not found and not copies:  # the usual step without repeats: all computed
            hit, misses, writes = [], list(range(n)), dict(zip(rows, keys, strict=True))
        else:
            hit = [rows[i] for i in found]
            held, found_at = set(hit), set(found)
            misses = [row for row in range(n) if row not in held and row not in copies]
            writes = {row: key for i, (row, key) in enumerate(zip(rows, keys, strict=True)) if i not in found_at}
        if first_layer and writes:
            self._gather(call, list(writes), list(writes.values()))
        self.dispatched_rows += len(misses)
        handle = None
        if len(misses) == n:  # nothing found: send the step as it is, no gather
            handle = self.inner.submit(call)
        elif misses:
            index = torch.tensor(misses, device=call.x.device)
            handle = self.inner.submit(ExpertCall(call.layer, call.x[index], call.weights[index], call.ids[index],
                                                  num_decode=sum(1 for r in misses if r < call.num_decode),
                                                  request_ids=call.request_ids, step_id=call.step_id))
        return _Assembly(self, call.x, hit, stored, misses, handle, writes, copies,
                         self._bundle_part(call, step_keys, cached[0]))

    def _cached_rows(self, call: ExpertCall) -> list[int]:
        rows = call.x.shape[0]
        phases = self.config.phases
        decode = range(call.num_decode) if phases in ("decode", "both") else range(0)
        prefill = range(call.num_decode, rows) if phases in ("prefill", "both") else range(0)
        return [*decode, *prefill]

    def _keys(self, call: ExpertCall, rows: list[int]) -> list[str]:
        """One key per row: the hash of its input bytes, expert ids (int32) and gate weights (float32)."""
        head = self._head(call.layer)
        if len(rows) <= SMALL_ROWS:
            return _small_keys(head, call, rows)
        x, ids, weights = call.x, call.ids, call.weights
        if len(rows) < x.shape[0]:  # rows are in order, so all of them means no gather
            index = torch.tensor(rows, device=x.device)
            x, ids, weights = x[index], ids[index], weights[index]
        # the records joined by numpy: torch.cat over uint8 columns is ~10x slower
        records = np.concatenate([_bytes_of(x), _bytes_of(ids, np.int32), _bytes_of(weights, np.float32)], axis=1)
        return row_keys(head, memoryview(records).cast("B"), records.shape[1])

    def _lookup(self, call: ExpertCall, keys: list[str], ask_redis: bool) -> tuple[list[int], np.ndarray]:
        """The positions in `keys` that either tier holds, ascending, and their stored rows [found, row bytes]
        uint8 in that order. Redis, when asked, also hands over the rows of the later layers (to the local tier)."""
        started = time.perf_counter()
        found, stored = self.local.get_rows(keys)
        self._count_result("local", "hit", len(found))
        self._count_result("local", "miss", len(keys) - len(found))
        self._observe("local", started)
        if not ask_redis or len(found) == len(keys):
            return found, stored
        held = set(found)
        ask = [i for i in range(len(keys)) if i not in held]
        started = time.perf_counter()
        answers = self.redis.get_many([keys[i] for i in ask])
        self._observe("redis", started)
        if answers is None:
            self._count_result("redis", "error", len(ask))
            return found, stored
        form = self._format(call)
        fresh, values, garbage = [], [], 0
        for i, value in zip(ask, answers, strict=True):
            if value is not None and not form.valid(value, keys[i]):  # not something we wrote: count it, compute
                garbage += 1
            elif value is not None:
                fresh.append(i)
                values.append(value)
        self._count_result("redis", "hit", len(fresh))
        self._count_result("redis", "miss", len(ask) - len(fresh) - garbage)
        self._count_result("redis", "error", garbage)
        if not fresh:
            return found, stored
        got = self._unpack(form, np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(fresh), form.size))
        if not found:
            return fresh, got
        merged = found + fresh
        order = sorted(range(len(merged)), key=merged.__getitem__)
        return [merged[i] for i in order], np.concatenate([stored, got])[order]

    def _unpack(self, form: BundleFormat, values: np.ndarray) -> np.ndarray:
        """Every layer's rows of Redis values into the local tier, under each layer's key; -> the first
        layer's rows [values, row bytes] (a copy: later stores cannot touch it)."""
        for position, layer in enumerate(form.layers):
            head = self._head(layer)
            keys = [head + digest for digest in form.digests(values, position)]
            self.local.put_rows(keys, form.rows(values, position))
        return np.array(form.rows(values, 0))

    def _format(self, call: ExpertCall) -> BundleFormat:
        row_bytes = call.x.shape[1] * call.x.element_size()
        if self._form is None or self._form.row_bytes != row_bytes:
            self._form = BundleFormat(self.moe_layers, row_bytes)
        return self._form

    def _gather(self, call: ExpertCall, rows: list[int], keys: list[str]) -> None:
        """Start the step's Redis values: these rows (that no tier held), under these first-layer keys."""
        self._gathering[call.step_id] = StepBundles(call.step_id, self._format(call), rows, keys)
        while len(self._gathering) > GATHERING_STEPS:
            self._gathering.popitem(last=False)

    def _bundle_part(self, call: ExpertCall, step_keys: list[str], first_row: int) -> tuple | None:
        """(the step's values, this layer's position in them, the keys of their rows here), if being gathered."""
        step = self._gathering.get(call.step_id) if self.redis is not None else None
        if step is None or call.layer not in self.moe_layers:
            return None
        return step, self.moe_layers.index(call.layer), [step_keys[row - first_row] for row in step.rows]

    def _finish(self, step: StepBundles) -> None:
        """The step's last MoE layer is in: its values go to Redis, one per token."""
        if self._gathering.get(step.step_id) is step:
            del self._gathering[step.step_id]
        if step.complete:  # a value lacking a layer would be refused by no one: never write it
            self.redis.put_rows(step.keys, step.values)

    def _head(self, layer: int) -> str:
        return f"{self.config.prefix}:{self.revision}:{layer}:"

    def _count_result(self, tier: str, result: str, n: int) -> None:
        if self.metrics and n:
            self.metrics.request(tier, result).inc(n)

    def _observe(self, tier: str, started: float) -> None:
        if self.metrics:
            self.metrics.lookup_of(tier).observe(time.perf_counter() - started)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        self.inner.close()


class _Assembly:
    """The step's output in row order: cached rows from their stored bytes, the rest from the experts."""

    def __init__(self, cache: CachedExperts, x: torch.Tensor, hit: list[int], stored: np.ndarray,
                 misses: list[int], handle: ExpertHandle | None, writes: dict[int, str], copies: dict[int, int],
                 bundle: tuple[StepBundles, int, list[str]] | None):
        self.cache, self.x, self.hit, self.stored, self.misses = cache, x, hit, stored, misses
        self.handle, self.writes, self.copies, self.bundle = handle, writes, copies, bundle

    def result(self) -> torch.Tensor:
        out = self._assemble()
        if self.bundle is not None:  # this layer's part of the step's Redis values, whatever each row's source
            step, position, keys = self.bundle
            data = _bytes_of(out)
            step.fill(position, keys, data if len(step.rows) == len(data) else data[step.rows])
            if position == len(step.form.layers) - 1:
                self.cache._finish(step)
        return out

    def _assemble(self) -> torch.Tensor:
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
        """The computed rows into the local tier (Redis gets them with the step's other layers)."""
        if not self.writes:
            return
        data = _bytes_of(computed)  # [misses, row bytes], over the output's own memory
        if len(self.misses) == self.x.shape[0]:  # row i of the output is row i of the step
            index = list(self.writes)
        else:
            position = {row: i for i, row in enumerate(self.misses)}
            index = [position[row] for row in self.writes]
        rows = data if len(index) == len(data) else data[index]  # ascending and distinct: all rows means every one
        self.cache.local.put_rows(list(self.writes.values()), rows)


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
