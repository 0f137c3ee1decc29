"""Decode attention read straight from the paged KV cache (kernels/paged_attention.cpp) on CPU: float32
or bfloat16 caches, computed in float32.

torch's path gathers every sequence's blocks into a padded batch (a copy of all cached keys and
values of the step, each layer) and then runs SDPA over it; this kernel reads the blocks where they
lie, once. Each sequence's result depends only on its own query and cache, so one call serves both
the batched and the batch-invariant decode (`attention.decode_attention_each`). `MOE_PAGED_ATTENTION`
(auto | 1 | 0) as for every native kernel (`moe_core.native`); on `auto` it runs on every CPU with AVX2
and FMA, AVX-512 ones included.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from moe_core import native

SETTING = "MOE_PAGED_ATTENTION"


CACHE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _kernels() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    lib = native.load("paged_attention")
    if lib is None:
        return None
    kernels = {torch.float32: lib.paged_decode_attention, torch.bfloat16: lib.paged_decode_attention_bf16}
    for fn in kernels.values():
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_float, ctypes.c_void_p]
    return kernels


def usable(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> bool:
    """Whether this step's decode attention can run here (CPU, a float32 or bfloat16 cache, head size a
    multiple of 8)."""
    return (q.device.type == "cpu" and cache_k.dtype in CACHE_DTYPES and q.shape[-1] % 8 == 0
            and cache_k.is_contiguous() and cache_v.is_contiguous()
            and native.wanted(SETTING, beside_avx512=True)
            and _kernels() is not None)


def decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_tables: torch.Tensor,
           lengths: torch.Tensor, block_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """q [B, heads, D] (each sequence's token at position length - 1), caches [slots, kv_heads, D],
    block_tables [B, blocks], lengths [B] int64 -> [B, heads, D]."""
    b, heads, d = q.shape
    kv_heads = cache_k.shape[1]
    if (heads % kv_heads or cache_k.shape != cache_v.shape or cache_k.shape[2] != d
            or cache_k.dtype != cache_v.dtype or cache_k.dtype not in CACHE_DTYPES):
        raise ValueError(f"query {tuple(q.shape)} does not fit caches {tuple(cache_k.shape)} {cache_k.dtype}, "
                         f"{tuple(cache_v.shape)} {cache_v.dtype}")
    query, tables = q.float().contiguous(), block_tables.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty_like(query)
    if b:
        kernel = _kernels()[cache_k.dtype]
        kernel(query.data_ptr(), b, heads, d, cache_k.data_ptr(), cache_v.data_ptr(), kv_heads, tables.data_ptr(),
               tables.shape[1], block_size, lengths.data_ptr(), window or 0, scale, out.data_ptr())
    return out.to(q.dtype)
