"""Keys of the expert-output cache: each row's digest, the rows of a step that share one, and the local
tier's LRU index from (layer, digest) to a slab slot.

A digest is the 16-byte xxh3-128 (canonical byte order) of a row's record: its input bytes, its expert
ids as int32 and its gate weights as float32. A key is (layer, digest) in the local tier and
"prefix:revision:layer:" + the digest in hex in Redis.

The work runs in one native call per layer step (moe_core/kernels/row_cache.cpp); where that library
cannot be built (or MOE_ROW_CACHE=0) the same digests and the same LRU come from Python, a few
microseconds per row slower.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from moe_core import native

DIGEST_BYTES = 16
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
NIBBLES = np.zeros(256, dtype=np.uint8)  # ASCII hex digit -> its value (anything else -> 0)
NIBBLES[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)
NIBBLES[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _library() -> ctypes.CDLL | None:
    lib = native.load("row_cache")
    if lib is None:
        return None
    lib.row_cache_digests.argtypes = [_P, _I64, _I64, _P, _P, ctypes.c_int32, _P, _I64, _P]
    lib.row_cache_digests.restype = None
    lib.row_cache_firsts.argtypes = [_P, _I64, _P]
    lib.row_cache_firsts.restype = _I64
    lib.row_cache_new.argtypes = [_I64]
    lib.row_cache_new.restype = _P
    lib.row_cache_free.argtypes = [_P]
    lib.row_cache_free.restype = None
    lib.row_cache_len.argtypes = [_P]
    lib.row_cache_len.restype = _I64
    for name in ("row_cache_get", "row_cache_put"):
        getattr(lib, name).argtypes = [_P, ctypes.c_int32, _P, _I64, _P]
    lib.row_cache_get.restype = _I64
    lib.row_cache_put.restype = None
    lib.row_cache_lookup.argtypes = [_P, ctypes.c_int32, _P, _I64, _I64, _P, _P, ctypes.c_int32, _I64, _P, _P, _P, _P]
    lib.row_cache_lookup.restype = _I64
    lib.row_cache_store.argtypes = [_P, ctypes.c_int32, _P, _I64, _P, _I64, _P, _P, _I64]
    lib.row_cache_store.restype = None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The native library, or None where it cannot be built (logged once by moe_core.native) or where
    MOE_ROW_CACHE=0 asks for the Python index."""
    return None if os.environ.get("MOE_ROW_CACHE", "auto") == "0" else _library()


@dataclass
class StepKeys:
    """A layer step's keys for its rows start..stop-1 (position i is row start + i)."""

    digests: np.ndarray  # [n, 16] uint8
    first: np.ndarray  # int64 [n]: the first position with the same digest (i itself for the first)
    repeats: int  # positions whose digest an earlier one has
    slots: np.ndarray  # int64 [n]: the local tier's slot of each first position, -1 where not held or a repeat
    held: int  # first positions the local tier holds


def _step_inputs(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, start: int, stop: int):
    """x, ids (int64) and weights (float32) of rows start..stop-1 on the CPU, rows of x dense, ids and weights
    contiguous, with a pointer to row `start` of each; no copies where they are so already (the usual case)."""
    if x.device.type != "cpu":
        x, ids, weights = x[start:stop].cpu(), ids[start:stop].cpu(), weights[start:stop].cpu()
        start = 0
    if ids.dtype is not torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    if weights.dtype is not torch.float32 or not weights.is_contiguous():
        weights = weights.to(torch.float32).contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    k = ids.shape[1]
    pointers = (x.data_ptr() + start * x.stride(0) * x.element_size(), ids.data_ptr() + 8 * k * start,
                weights.data_ptr() + 4 * k * start)
    return (x, ids, weights), pointers


def lookup_step(index: SlotIndex | None, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                start: int, stop: int) -> StepKeys:
    """The keys of rows start..stop-1 and the local tier's slots of the first row of each digest (`index`;
    None: nothing held yet). One native call where the library is there: on the router's cores each call
    into numpy or torch costs microseconds, so a step's keys cost about as much for 1 row as for 32."""
    n = stop - start
    if index is not None and index.native and n > 0:
        return index.lookup_step(layer, x, ids, weights, start, stop)
    native = index is None or index.native
    digests = row_digests(x, ids, weights, start, stop, use_native=native)
    first, repeats = step_firsts(digests, use_native=native)
    if index is None or n == 0:
        return StepKeys(digests, first, repeats, np.full(n, -1, dtype=np.int64), 0)
    if repeats:
        slots = np.full(n, -1, dtype=np.int64)
        unique = np.flatnonzero(first == np.arange(n))
        slots[unique] = index.get(layer, digests[unique])
    else:
        slots = index.get(layer, digests)
    return StepKeys(digests, first, repeats, slots, int(np.count_nonzero(slots >= 0)))


def row_digests(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, start: int, stop: int,
                use_native: bool = True) -> np.ndarray:
    """[stop - start, 16] uint8: the digests of rows start..stop-1 (x [T, H], ids [T, k], weights [T, k])."""
    n = stop - start
    if n <= 0:
        return np.empty((0, DIGEST_BYTES), dtype=np.uint8)
    (x, ids, weights), (px, pids, pweights) = _step_inputs(x, ids, weights, start, stop)
    lib = library() if use_native else None
    if lib is not None:
        out = np.empty((n, DIGEST_BYTES), dtype=np.uint8)
        lib.row_cache_digests(px, x.stride(0) * x.element_size(), x.shape[1] * x.element_size(), pids, pweights,
                              ids.shape[1], None, n, out.ctypes.data)
        return out
    if x.shape[0] != n:
        x, ids, weights = x[start:stop], ids[start:stop], weights[start:stop]
    rows = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16: bytes count
    # the records side by side by numpy, then one xxh3 call per row: little-endian, as the native code reads them
    records = np.concatenate([np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1),
                              ids.numpy().astype("<i4").view(np.uint8).reshape(n, -1),
                              weights.numpy().astype("<f4").view(np.uint8).reshape(n, -1)], axis=1)
    width, view, digest = records.shape[1], memoryview(records).cast("B"), xxhash.xxh3_128_digest
    joined = b"".join([digest(view[i:i + width]) for i in range(0, n * width, width)])
    return np.frombuffer(joined, dtype=np.uint8).reshape(n, DIGEST_BYTES).copy()


def step_firsts(digests: np.ndarray, use_native: bool = True) -> tuple[np.ndarray, int]:
    """(first, repeats): first[i] is the first row whose digest equals row i's (i itself for the first
    one), and repeats how many rows repeat an earlier one."""
    n = len(digests)
    first = np.empty(n, dtype=np.int64)
    lib = library() if use_native else None
    if lib is not None:
        digests = np.ascontiguousarray(digests)
        return first, int(lib.row_cache_firsts(digests.ctypes.data, n, first.ctypes.data))
    seen: dict[bytes, int] = {}
    data = digests.tobytes()
    firsts = [seen.setdefault(data[i:i + DIGEST_BYTES], i // DIGEST_BYTES) for i in range(0, len(data), DIGEST_BYTES)]
    first[:] = firsts
    return first, n - len(seen)


def hex_of(digests: np.ndarray) -> np.ndarray:
    """[n, 32] ASCII lowercase hex of [n, 16] digests."""
    out = np.empty((len(digests), 2 * DIGEST_BYTES), dtype=np.uint8)
    out[:, 0::2] = HEX[digests >> 4]
    out[:, 1::2] = HEX[digests & 15]
    return out


def digests_of_hex(text: np.ndarray) -> np.ndarray:
    """[n, 16] digests of [n, 32] ASCII hex (a corrupt digit reads as 0: such a key is merely never asked)."""
    nibbles = NIBBLES[text]
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]


def redis_keys(head: str, digests: np.ndarray) -> list[str]:
    """head + hex digest per row: the Redis keys of these rows."""
    text = hex_of(digests).tobytes().decode("ascii")
    width = 2 * DIGEST_BYTES
    return [head + text[i:i + width] for i in range(0, len(text), width)]


class SlotIndex:
    """LRU map (layer, digest) -> slot of a slab of `slots` rows; not thread-safe (LocalCache locks)."""

    def __init__(self, slots: int, use_native: bool = True):
        self.slots = slots
        self._lib = library() if use_native else None
        self._native = self._lib.row_cache_new(slots) if self._lib is not None else None
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # the Python index: key -> slot, oldest first
        self._unused = 0

    @property
    def native(self) -> bool:
        return self._native is not None

    def __len__(self) -> int:
        return int(self._lib.row_cache_len(self._native)) if self._native is not None else len(self._entries)

    def __del__(self) -> None:
        if getattr(self, "_native", None) is not None:
            self._lib.row_cache_free(self._native)
            self._native = None

    def get(self, layer: int, digests: np.ndarray) -> np.ndarray:
        """int64 [n]: each key's slot, or -1; the held ones become the most recently used."""
        if self._native is not None:
            return self._native_slots(self._lib.row_cache_get, layer, digests)
        slots = np.empty(len(digests), dtype=np.int64)
        entries = self._entries
        for i, key in enumerate(_keys(layer, digests)):
            slot = entries.get(key)
            if slot is None:
                slots[i] = -1
            else:
                entries.move_to_end(key)
                slots[i] = slot
        return slots

    def _native_slots(self, fn: ctypes._CFuncPtr, layer: int, digests: np.ndarray) -> np.ndarray:
        slots = np.empty(len(digests), dtype=np.int64)
        digests = np.ascontiguousarray(digests)
        fn(self._native, layer, digests.ctypes.data, len(digests), slots.ctypes.data)
        return slots

    def lookup_step(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, start: int,
                    stop: int) -> StepKeys:
        """lookup_step() in one native call (this index is native)."""
        n = stop - start
        (x, ids, weights), (px, pids, pweights) = _step_inputs(x, ids, weights, start, stop)
        out = np.empty(n * (DIGEST_BYTES + 16) + 8, dtype=np.uint8)  # digests, first, slots, repeats
        at, digests_end, first_end, slots_end = out.ctypes.data, n * DIGEST_BYTES, n * (DIGEST_BYTES + 8), \
            n * (DIGEST_BYTES + 16)
        held = self._lib.row_cache_lookup(self._native, layer, px, x.stride(0) * x.element_size(),
                                          x.shape[1] * x.element_size(), pids, pweights, ids.shape[1], n, at,
                                          at + digests_end, at + first_end, at + slots_end)
        return StepKeys(out[:digests_end].reshape(n, DIGEST_BYTES), out[digests_end:first_end].view(np.int64),
                        int(out[slots_end:].view(np.int64)[0]), out[first_end:slots_end].view(np.int64), int(held))

    def store(self, layer: int, digests: np.ndarray, rows_at: int, row_stride: int, pick: np.ndarray | None,
              slab: np.ndarray) -> None:
        """put() the keys and copy key i's row (row pick[i], or i, of the rows at address `rows_at`,
        row_stride bytes apart) into its slot of `slab`, in one native call (this index is native)."""
        digests = np.ascontiguousarray(digests)
        if pick is not None:
            pick = np.ascontiguousarray(pick, dtype=np.int64)
        self._lib.row_cache_store(self._native, layer, digests.ctypes.data, len(digests), rows_at, row_stride,
                                  None if pick is None else pick.ctypes.data, slab.ctypes.data, slab.shape[1])

    def put(self, layer: int, digests: np.ndarray) -> np.ndarray:
        """int64 [n]: the slot each key now has (held: its own, made the most recent; new: a never-used
        slot or the least recently used entry's). Keys of one call take each other's slots only when there
        are more than `slots` of them: then the last ones hold theirs."""
        if self._native is not None:
            return self._native_slots(self._lib.row_cache_put, layer, digests)
        slots = np.empty(len(digests), dtype=np.int64)
        entries = self._entries
        for i, key in enumerate(_keys(layer, digests)):
            slot = entries.get(key)
            if slot is not None:
                entries.move_to_end(key)
            else:
                if self._unused < self.slots:
                    slot, self._unused = self._unused, self._unused + 1
                else:
                    slot = entries.popitem(last=False)[1]
                entries[key] = slot
            slots[i] = slot
        return slots


def _keys(layer: int, digests: np.ndarray) -> list[bytes]:
    head = struct.pack("<i", layer)
    data = digests.tobytes()
    return [head + data[i:i + DIGEST_BYTES] for i in range(0, len(data), DIGEST_BYTES)]
