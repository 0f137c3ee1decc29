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
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moe_core.forward import ExpertCall, ExpertHandle
from moe_core.metrics import LATENCY_BUCKETS
from router_service.cache import CacheConfig, LocalCache, RedisCache, bytes_of
from router_service.cache_bundles import BundleFormat, StepBundles
from router_service.expert_backend import ExpertBackend, WrappedBackend
from router_service.row_keys import StepKeys, digests_of_hex, redis_keys

log = logging.getLogger(__name__)

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
        log.info("expert cache: %d MiB for %d rows reserved in %.2fs%s%s", self.config.local_bytes >> 20,
                 self.local.capacity, time.perf_counter() - started, "" if faulted else " (pages fault in later)",
                 "" if self.local.native else "; its index runs in Python (no native library)")

    def submit(self, call: ExpertCall) -> ExpertHandle:
        n = call.x.shape[0]
        start, stop = self._cached_span(call)
        if start == stop:
            self.dispatched_rows += n
            return self.inner.submit(call)
        first_layer = self.redis is not None and call.layer == self.moe_layers[0]
        keys, found, stored, asked = self._lookup(call, start, stop, first_layer)  # found: positions, row start + i
        digests = keys.digests
        if not len(found) and not keys.repeats:  # the usual step without repeats: all computed, all written
            hit, misses, copies, writes = found, None, None, (np.arange(start, stop), digests)
        elif len(found) == n and not keys.repeats:  # every row held (a repeat decoding alone): nothing to do
            hit, misses, copies, writes = found, found[:0], None, (found[:0], digests[:0])
        else:
            # a repeated digest's first row looks it up (and computes it on a miss); the others copy it
            positions = np.arange(stop - start)
            copied = np.flatnonzero(keys.first != positions)
            copies = (start + copied, start + keys.first[copied]) if len(copied) else None
            hit = start + found
            computed = np.ones(n, dtype=bool)
            computed[hit] = False
            unwritten = keys.first == positions
            unwritten[found] = False
            if copies is not None:
                computed[copies[0]] = False
            misses = np.flatnonzero(computed)
            written = np.flatnonzero(unwritten)
            writes = (start + written, digests[written])
        if first_layer and len(writes[0]):
            # the rows asked of Redis and still missing: their Redis names are made once
            names = asked[1] if asked is not None and len(asked[0]) == len(writes[0]) else None
            self._gather(call, *writes, names)
        handle = None
        if misses is None:  # nothing found: send the step as it is, no gather
            self.dispatched_rows += n
            handle = self.inner.submit(call)
        elif len(misses):
            self.dispatched_rows += len(misses)
            index = torch.from_numpy(misses).to(call.x.device)
            handle = self.inner.submit(ExpertCall(call.layer, call.x[index], call.weights[index], call.ids[index],
                                                  num_decode=int(np.searchsorted(misses, call.num_decode)),
                                                  request_ids=call.request_ids, step_id=call.step_id))
        return _Assembly(self, call, hit, stored, misses, handle, writes, copies,
                         self._bundle_part(call, digests, start))

    def _cached_span(self, call: ExpertCall) -> tuple[int, int]:
        """The rows of the cached phases, [start, stop): decode rows come first in a step."""
        phases = self.config.phases
        start = 0 if phases in ("decode", "both") else call.num_decode
        stop = call.x.shape[0] if phases in ("prefill", "both") else call.num_decode
        return start, max(start, stop)

    def _lookup(self, call: ExpertCall, start: int, stop: int, ask_redis: bool
                ) -> tuple[StepKeys, np.ndarray, np.ndarray, tuple[np.ndarray, list[str]] | None]:
        """The keys of rows start..stop-1, the positions among them that either tier holds, ascending, their
        stored rows [found, row bytes] uint8 in that order, and the positions asked of Redis with their Redis
        names (None: not asked). Only the first row of a repeated digest is looked up. Redis, when asked,
        also hands over the rows of the later layers (to the local tier)."""
        started = time.perf_counter()
        keys, stored = self.local.lookup_step(call.layer, call.x, call.ids, call.weights, start, stop)
        found = np.empty(0, dtype=np.int64) if not keys.held else \
            np.arange(keys.held) if keys.held == stop - start else np.flatnonzero(keys.slots >= 0)
        looked_up = stop - start - keys.repeats  # a repeated digest is looked up once
        self._count_result("local", "hit", keys.held)
        self._count_result("local", "miss", looked_up - keys.held)
        self._count_result("local", "shared", keys.repeats)
        self._observe("local", started)
        if not ask_redis or keys.held == looked_up:
            return keys, found, stored, None
        missing = keys.first == np.arange(stop - start)
        missing[found] = False
        ask = np.flatnonzero(missing)
        names = redis_keys(self._head(call.layer), keys.digests[ask])
        started = time.perf_counter()
        answers = self.redis.get_many(names)
        self._observe("redis", started)
        if answers is None:
            self._count_result("redis", "error", len(ask))
            return keys, found, stored, (ask, names)
        form = self._format(call)
        fresh, values, garbage = [], [], 0
        for i, name, value in zip(ask.tolist(), names, answers, strict=True):
            if value is not None and not form.valid(value, name):  # not something we wrote: count it, compute
                garbage += 1
            elif value is not None:
                fresh.append(i)
                values.append(value)
        self._count_result("redis", "hit", len(fresh))
        self._count_result("redis", "miss", len(ask) - len(fresh) - garbage)
        self._count_result("redis", "error", garbage)
        if not fresh:
            return keys, found, stored, (ask, names)
        got = self._unpack(form, np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(fresh), form.size))
        fresh_at = np.array(fresh, dtype=np.int64)
        if not len(found):
            return keys, fresh_at, got, (ask, names)
        merged = np.concatenate([found, fresh_at])
        order = np.argsort(merged, kind="stable")
        return keys, merged[order], np.concatenate([stored, got])[order], (ask, names)

    def _unpack(self, form: BundleFormat, values: np.ndarray) -> np.ndarray:
        """Every layer's rows of Redis values into the local tier, under each layer's key; -> the first
        layer's rows [values, row bytes] (a copy: later stores cannot touch it)."""
        for position, layer in enumerate(form.layers):
            self.local.put_rows(layer, digests_of_hex(form.digests(values, position)), form.rows(values, position))
        return np.array(form.rows(values, 0))

    def _format(self, call: ExpertCall) -> BundleFormat:
        row_bytes = call.x.shape[1] * call.x.element_size()
        if self._form is None or self._form.row_bytes != row_bytes:
            self._form = BundleFormat(self.moe_layers, row_bytes)
        return self._form

    def _gather(self, call: ExpertCall, rows: np.ndarray, digests: np.ndarray, names: list[str] | None) -> None:
        """Start the step's Redis values: these rows (that no tier held), under their first-layer keys
        (`names`, where already made)."""
        keys = names if names is not None else redis_keys(self._head(call.layer), digests)
        self._gathering[call.step_id] = StepBundles(call.step_id, self._format(call), rows, keys)
        while len(self._gathering) > GATHERING_STEPS:
            self._gathering.popitem(last=False)

    def _bundle_part(self, call: ExpertCall, digests: np.ndarray, start: int) -> tuple | None:
        """(the step's values, this layer's position in them, the digests of their rows here), if being gathered."""
        step = self._gathering.get(call.step_id) if self.redis is not None else None
        if step is None or call.layer not in self.moe_layers:
            return None
        picked = digests if len(step.rows) == len(digests) else digests[step.rows - start]
        return step, self.moe_layers.index(call.layer), picked

    def _finish(self, step: StepBundles) -> None:
        """The step's last MoE layer is in: its values go to Redis, one per token."""
        if self._gathering.get(step.step_id) is step:
            del self._gathering[step.step_id]
        if step.complete:  # a value lacking a layer would be refused by no one: never write it
            self.redis.put_rows(step.keys, step.finished())

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

    def __init__(self, cache: CachedExperts, call: ExpertCall, hit: np.ndarray, stored: np.ndarray,
                 misses: np.ndarray | None, handle: ExpertHandle | None, writes: tuple[np.ndarray, np.ndarray],
                 copies: tuple[np.ndarray, np.ndarray] | None, bundle: tuple[StepBundles, int, np.ndarray] | None):
        self.cache, self.call, self.hit, self.stored = cache, call, hit, stored
        self.misses, self.handle, self.writes, self.copies, self.bundle = misses, handle, writes, copies, bundle

    def result(self) -> torch.Tensor:
        out = self._assemble()
        if self.bundle is not None:  # this layer's part of the step's Redis values, whatever each row's source
            step, position, digests = self.bundle
            data = bytes_of(out)
            step.fill(position, digests, data if len(step.rows) == len(data) else data[step.rows])
            if position == len(step.form.layers) - 1:
                self.cache._finish(step)
        return out

    def _assemble(self) -> torch.Tensor:
        x = self.call.x
        if self.misses is None:  # every row computed, in order
            computed = self.handle.result()
            self._remember(computed)
            return computed
        stored = None
        if len(self.hit):
            stored = torch.from_numpy(self.stored).view(x.dtype).view(len(self.hit), x.shape[1]).to(x.device)
            if len(self.hit) == x.shape[0]:  # every row a hit (a repeat decoding alone): already in row order
                return stored
        out = torch.empty_like(x)
        if stored is not None:
            out[torch.from_numpy(self.hit).to(x.device)] = stored
        if self.handle is not None:
            computed = self.handle.result()
            out[torch.from_numpy(self.misses).to(x.device)] = computed
            self._remember(computed)
        if self.copies is not None:
            rows, sources = self.copies
            out[torch.from_numpy(rows).to(x.device)] = out[torch.from_numpy(sources).to(x.device)]
        return out

    def _remember(self, computed: torch.Tensor) -> None:
        """The computed rows into the local tier (Redis gets them with the step's other layers)."""
        rows, digests = self.writes
        if not len(rows):
            return
        # row r of the step is row r of `computed` when all were computed, else its place among the misses
        pick = rows if self.misses is None else np.searchsorted(self.misses, rows)
        if len(pick) == computed.shape[0]:  # every computed row, in order
            pick = None
        self.cache.local.put_output(self.call.layer, digests, computed, pick)


