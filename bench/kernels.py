"""The native kernels against torch's, side by side in one process, on bench-s shapes.

    python -m bench.kernels [--threads 2] [--rows 1 4 8 16 32 64 256]

Expert GEMMs: one expert's gate/up and down projections (512 -> 2x1408 -> 512) over 64 experts' weights in
turn, so the weights come from memory as in a decode step; oneDNN's packed float32 and bfloat16 layouts
against the panel GEMM with float32 and with bfloat16 weights, and (on CPUs with AVX512-BF16) the bfloat16
pair-dot GEMM; on AMX CPUs, bfloat16 oneDNN against the pair dot and the GEMM on AMX tiles. One MoE
layer's routed experts (CPUs with AVX512-BF16): the grouped torch ops over oneDNN and over this process's
bfloat16 GEMM (pair dot or AMX) against one `bf16_moe` call, for the experts one process, one shard of two,
and one FFN half of two hold, top-2 of 8, over 8 layers' weights in turn. Decode attention: 32 sequences of 40-600
cached tokens over 8 layers' caches, float32 and bfloat16; torch's block gather plus SDPA (batched in
length groups, and one call per sequence) against the paged kernel. Best of interleaved rounds.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_core import bf16_gemm, paged_attention, panel_gemm
from moe_core.attention import decode_attention, decode_attention_each, decode_groups
from moe_core.dtypes import cpu_flags
from moe_core.experts import expert_forward
from moe_core.linear import Linear
from moe_core.weights import LayerExperts

EXPERTS, HIDDEN, INTERMEDIATE = 64, 512, 1408
ROUNDS = 5


def best_of(fns: dict[str, callable]) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def expert_gemms(rows: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    ups = [torch.randn(2 * INTERMEDIATE, HIDDEN, generator=g) for _ in range(EXPERTS)]
    downs = [torch.randn(HIDDEN, INTERMEDIATE, generator=g) for _ in range(EXPERTS)]
    onednn = {dtype: [(Linear(u.to(dtype), pack=True), Linear(d.to(dtype), pack=True))
                      for u, d in zip(ups, downs, strict=True)] for dtype in (torch.float32, torch.bfloat16)}
    assert all(layer.packed is not None for pair in onednn[torch.float32] for layer in pair), "no oneDNN packing"
    panels = {dtype: [(panel_gemm.pack(u.to(dtype)), panel_gemm.pack(d.to(dtype))) for u, d in zip(ups, downs,
                                                                                                   strict=True)]
              for dtype in (torch.float32, torch.bfloat16)}
    pairs = ([(bf16_gemm.pack(u.bfloat16()), bf16_gemm.pack(d.bfloat16())) for u, d in zip(ups, downs, strict=True)]
             if cpu_flags() >= bf16_gemm.NEEDS and bf16_gemm.library() is not None else None)
    weight_bytes = EXPERTS * 3 * HIDDEN * INTERMEDIATE * 4
    print("| rows | oneDNN f32 ms/expert | panel f32 ms/expert | oneDNN bf16 ms/expert | panel bf16-weight ms/expert "
          "| bf16 pair-dot ms/expert | panel f32 / oneDNN f32 speed | pair-dot / oneDNN bf16 speed | "
          "panel f32 GB/s | pair-dot GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in rows:
        x, h = torch.randn(m, HIDDEN), torch.randn(m, INTERMEDIATE)

        def run_onednn(dtype, x=x, h=h):
            xs, hs = x.to(dtype), h.to(dtype)

            def run():
                for up, down in onednn[dtype]:
                    up(xs)
                    down(hs)
            return run

        def run_panels(dtype, x=x, h=h):
            def run():
                for up, down in panels[dtype]:
                    panel_gemm.matmul(x, up, 2 * INTERMEDIATE)
                    panel_gemm.matmul(h, down, HIDDEN)
            return run

        def run_pairs_of(xs, hs):
            def run():
                for up, down in pairs:
                    bf16_gemm.matmul(xs, up, 2 * INTERMEDIATE)
                    bf16_gemm.matmul(hs, down, HIDDEN)
            return run

        run_pairs = run_pairs_of(x.bfloat16(), h.bfloat16())

        fns = {"onednn": run_onednn(torch.float32), "f32": run_panels(torch.float32),
               "onednn_bf16": run_onednn(torch.bfloat16), "bf16": run_panels(torch.bfloat16)}
        t = best_of(fns | ({"pairs": run_pairs} if pairs else {}))
        t.setdefault("pairs", float("nan"))
        per = {k: v / EXPERTS * 1e3 for k, v in t.items()}
        print(f"| {m} | {per['onednn']:.3f} | {per['f32']:.3f} | {per['onednn_bf16']:.3f} | {per['bf16']:.3f} | "
              f"{per['pairs']:.3f} | {t['onednn'] / t['f32']:.2f} | {t['onednn_bf16'] / t['pairs']:.2f} | "
              f"{weight_bytes / t['f32'] / 1e9:.1f} | {weight_bytes / 2 / t['pairs'] / 1e9:.1f} |")


def amx_gemms(rows: list[int]) -> None:
    """The same expert GEMMs as `expert_gemms`, in bfloat16: oneDNN's packed kernels (AMX tiles on such a
    CPU), the pair-dot GEMM and the GEMM on AMX tiles, over the same packed panels."""
    g = torch.Generator().manual_seed(0)
    ups = [torch.randn(2 * INTERMEDIATE, HIDDEN, generator=g).bfloat16() for _ in range(EXPERTS)]
    downs = [torch.randn(HIDDEN, INTERMEDIATE, generator=g).bfloat16() for _ in range(EXPERTS)]
    onednn = [(Linear(u, pack=True), Linear(d, pack=True)) for u, d in zip(ups, downs, strict=True)]
    pairs = [(bf16_gemm.pack(u), bf16_gemm.pack(d)) for u, d in zip(ups, downs, strict=True)]
    lib = bf16_gemm.library()
    print("| rows | oneDNN bf16 ms/expert | pair-dot ms/expert | AMX ms/expert | AMX / oneDNN speed | AMX GB/s |")
    print("|---|---|---|---|---|---|")
    for m in rows:
        x, h = torch.randn(m, HIDDEN).bfloat16(), torch.randn(m, INTERMEDIATE).bfloat16()

        def run_onednn(x=x, h=h):
            for up, down in onednn:
                up(x)
                down(h)

        def run_on(amx, x=x, h=h):
            def run():
                lib.bf16_gemm_set_amx(int(amx))  # between calls, never during one
                for up, down in pairs:
                    bf16_gemm.matmul(x, up, 2 * INTERMEDIATE)
                    bf16_gemm.matmul(h, down, HIDDEN)
            return run

        try:
            t = best_of({"onednn": run_onednn, "pairs": run_on(False), "amx": run_on(True)})
        finally:
            lib.bf16_gemm_set_amx(1)
        per = {k: v / EXPERTS * 1e3 for k, v in t.items()}
        print(f"| {m} | {per['onednn']:.3f} | {per['pairs']:.3f} | {per['amx']:.3f} | {t['onednn'] / t['amx']:.2f} | "
              f"{EXPERTS * 3 * HIDDEN * INTERMEDIATE * 2 / t['amx'] / 1e9:.1f} |")


def _layer_runs(stack: list[LayerExperts], onednn: list[LayerExperts], x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> dict[str, callable]:
    """Every layer of `stack` over the same rows: with the grouped torch ops, and with one native call each;
    the layers of `onednn` (the same weights, packed for oneDNN) with the torch ops."""
    def run_onednn():
        for layer in onednn:
            expert_forward(layer, x, ids, weights)

    def run_torch():
        kernels = [layer.kernel for layer in stack]
        try:
            for layer in stack:
                layer.kernel = None
                expert_forward(layer, x, ids, weights)
        finally:
            for layer, kernel in zip(stack, kernels, strict=True):
                layer.kernel = kernel

    def run_kernel():
        for layer in stack:
            expert_forward(layer, x, ids, weights)

    return {"onednn": run_onednn, "torch": run_torch, "kernel": run_kernel}


def expert_layers(rows: list[int], layers: int = 8) -> None:
    """bench-s's routed experts, top-2 of 8, as a process holds them: all 8 (one process), 4 of them (an
    expert shard of two), the first half of every expert's FFN (`--split ffn`, a shard of two)."""
    g = torch.Generator().manual_seed(2)
    holdings = {"8 experts": (list(range(8)), INTERMEDIATE), "4 of 8": ([0, 1, 2, 3], INTERMEDIATE),
                "8 FFN halves": (list(range(8)), INTERMEDIATE // 2)}
    print("| held | rows | oneDNN torch ops ms/layer | torch ops on the kernel | one call | one call / oneDNN speed "
          "| one call / torch ops speed |")
    print("|---|---|---|---|---|---|---|")
    for name, (held, inter) in holdings.items():
        local_of = torch.full((8,), -1, dtype=torch.int64)
        local_of[held] = torch.arange(len(held))
        weights_of = [([torch.randn(2 * inter, HIDDEN, generator=g).bfloat16() for _ in held],
                       [torch.randn(HIDDEN, inter, generator=g).bfloat16() for _ in held]) for _ in range(layers)]
        stack = [LayerExperts(i, held, [Linear(w) for w in ups], [Linear(w) for w in downs], local_of)
                 for i, (ups, downs) in enumerate(weights_of)]
        onednn = [LayerExperts(i, held, [Linear(w, pack=True) for w in ups], [Linear(w, pack=True) for w in downs],
                               local_of) for i, (ups, downs) in enumerate(weights_of)]
        for m in rows:
            x = torch.randn(m, HIDDEN, generator=g).bfloat16()
            ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(m)])
            ids = torch.where(torch.isin(ids, torch.tensor(held)), ids, torch.full_like(ids, -1))
            weights = torch.rand(m, 2, generator=g)
            t = {k: v / layers * 1e3 for k, v in best_of(_layer_runs(stack, onednn, x, ids, weights)).items()}
            print(f"| {name} | {m} | {t['onednn']:.3f} | {t['torch']:.3f} | {t['kernel']:.3f} | "
                  f"{t['onednn'] / t['kernel']:.2f} | {t['torch'] / t['kernel']:.2f} |")


def decode_attention_calls(dtype: torch.dtype, layers: int = 8, seqs: int = 32, block: int = 16) -> None:
    """Contexts of 40-600 tokens (the bench workload's spread); torch's batched path (length groups), its
    batch-invariant one (one SDPA call per sequence, what the expert-output cache needs), the paged kernel
    (batch-invariant by construction)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(40, 601, (seqs,), generator=g).tolist()
    width = -(-max(lengths) // block)
    tables = torch.randperm(seqs * width, generator=g).view(seqs, width)
    caches = [tuple(torch.randn(seqs * width * block, 2, 64, generator=g).to(dtype) for _ in range(2))
              for _ in range(layers)]
    q = torch.randn(seqs, 8, 64, generator=g).to(dtype)
    groups = decode_groups(tables, lengths, block, 2 * 2 * 64 * dtype.itemsize)
    lens = torch.tensor(lengths)

    def batched():
        for k, v in caches:
            decode_attention(q, k, v, groups, block, 0.125)

    def each():
        for k, v in caches:
            decode_attention_each(q, k, v, tables, lengths, block, 0.125)

    def kernel():
        for k, v in caches:
            paged_attention.decode(q, k, v, tables, lens, block, 0.125)

    t = {k: v / layers * 1e3 for k, v in best_of({"batched": batched, "each": each, "kernel": kernel}).items()}
    name = str(dtype).removeprefix("torch.")
    print(f"| {name} | {t['batched']:.3f} | {t['each']:.3f} | {t['kernel']:.3f} | {t['batched'] / t['kernel']:.2f} | "
          f"{t['each'] / t['kernel']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 256])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if panel_gemm.library() is None or not paged_attention._kernels():
        raise SystemExit("the native kernels cannot be built here (see the warning above)")
    print(f"threads {args.threads}\n")
    expert_gemms(args.rows)
    if bf16_gemm.amx():
        print("\nthe same in bfloat16 on AMX tiles\n")
        amx_gemms(args.rows)
    if cpu_flags() >= bf16_gemm.NEEDS and bf16_gemm.library() is not None:
        print("\none MoE layer's routed experts in bfloat16, top-2 of 8, 8 layers' weights in turn\n")
        expert_layers(args.rows)
    print("\ndecode attention, 32 sequences of 40-600 cached tokens, ms per layer\n")
    print("| cache dtype | torch batched (groups) | torch per sequence | paged kernel | batched / kernel | "
          "per sequence / kernel |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        decode_attention_calls(dtype)


if __name__ == "__main__":
    main()
