"""The routed experts on an accelerator: achieved TFLOP/s against the device's measured bf16 matmul peak.

    python -m bench.accelerator --device cuda --preset bench-m --out accelerator.json

DESIGN §8's GPU check, measured on the device itself, side by side in one process:
- the matmul peak: an N×N×N product in the dtype (N = 8192 by default), the best of timed rounds;
- the copy bandwidth: a device-to-device copy (bytes read plus written), the ceiling of a step that only
  reads weights;
- one MoE layer's routed experts as an expert service computes them (`expert_forward` over `LayerExperts`,
  top-k routing of random rows): every expert of the layer held (one process), and half of them (a shard
  of two). For each row count: ms per layer call, TFLOP/s and its share of the peak, and the expert weights
  read per second against the copy bandwidth, which is what bounds decode-sized batches.

`--device cpu` with small sizes runs the same code; that is how CI tests it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.models import PRESETS
from moe_core.dtypes import DTYPES, describe_device, resolve_device
from moe_core.experts import expert_forward
from moe_core.linear import Linear
from moe_core.weights import LayerExperts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: str, calls: int, rounds: int = 3) -> float:
    """The best round's mean time per call, after one untimed warm-up call; kernels are waited for."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def matmul_peak(device: str, dtype: torch.dtype, n: int, calls: int) -> float:
    """TFLOP/s of an n×n×n product (random data: all-zero inputs run faster on some GPUs)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, calls) / 1e12


def copy_bandwidth(device: str, mib: int, calls: int) -> float:
    """GB/s of a device-to-device copy, bytes read plus written."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * src.numel() / seconds_per_call(lambda: dst.copy_(src), device, calls) / 1e9


def layer_experts(hidden: int, ffn: int, experts: int, held: list[int], dtype: torch.dtype, device: str,
                  seed: int = 0) -> LayerExperts:
    g = torch.Generator().manual_seed(seed)
    local_of = torch.full((experts,), -1, dtype=torch.int64)
    local_of[held] = torch.arange(len(held))
    scale = hidden**-0.5  # keeps activations in range, as trained weights do

    def weight(rows: int, cols: int) -> Linear:
        return Linear((torch.randn(rows, cols, generator=g) * scale).to(dtype).to(device))

    return LayerExperts(0, held, [weight(2 * ffn, hidden) for _ in held], [weight(hidden, ffn) for _ in held],
                        local_of.to(device))


def routed_rows(rows: int, hidden: int, experts: int, top_k: int, held: list[int], dtype: torch.dtype,
                device: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, ids and weights of `rows` rows routed to top_k distinct experts each, uniformly; the pairs whose
    expert is not held are -1, as the router sends them to a shard."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    ids = torch.rand(rows, experts, generator=g).argsort(dim=1)[:, :top_k]
    ids = torch.where(torch.isin(ids, torch.tensor(held)), ids, torch.full_like(ids, -1))
    weights = torch.rand(rows, top_k, generator=g)
    return x.to(device), ids.to(device), weights.to(device)


def measure_layer(experts: LayerExperts, rows: int, shape: dict, dtype: torch.dtype, device: str, calls: int,
                  peak_tflops: float, copy_gbs: float) -> dict:
    hidden, ffn = shape["hidden_size"], shape["intermediate_size"]
    x, ids, weights = routed_rows(rows, hidden, shape["num_experts"], shape["top_k"], experts.expert_ids,
                                  dtype, device)
    pairs = int((ids >= 0).sum())
    touched = len(set(ids[ids >= 0].tolist()))  # experts whose weights the call reads
    with torch.inference_mode():
        seconds = seconds_per_call(lambda: expert_forward(experts, x, ids, weights), device, calls)
    tflops = 6 * hidden * ffn * pairs / seconds / 1e12  # gate and up (2·H·2F), down (2·F·H) per pair
    weight_gbs = touched * 3 * hidden * ffn * dtype.itemsize / seconds / 1e9
    return {"held": len(experts.expert_ids), "rows": rows, "pairs": pairs, "experts_read": touched,
            "ms": _sig(1e3 * seconds), "tflops": _sig(tflops), "peak_fraction": _sig(tflops / peak_tflops),
            "weight_gbs": _sig(weight_gbs), "copy_fraction": _sig(weight_gbs / copy_gbs)}


def _sig(value: float) -> float:
    """Four significant digits: a CPU's TFLOP/s and a GPU's are far apart."""
    return float(f"{value:.4g}")


def calls_for(seconds_hint: float, budget_s: float = 0.25) -> int:
    return max(3, min(200, int(budget_s / max(seconds_hint, 1e-6))))


def run(args: argparse.Namespace) -> dict:
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    preset = PRESETS[args.preset]
    shape = {"hidden_size": args.hidden or preset["hidden_size"],
             "intermediate_size": args.ffn or preset["intermediate_size"],
             "num_experts": args.experts or preset["num_local_experts"],
             "top_k": args.top_k or preset["num_experts_per_tok"]}
    peak = matmul_peak(device, dtype, args.matmul_size, args.matmul_calls)
    copy_gbs = copy_bandwidth(device, args.copy_mib, args.matmul_calls)
    everything = list(range(shape["num_experts"]))
    holdings = [everything, everything[: len(everything) // 2]] if len(everything) > 1 else [everything]
    layers = []
    for held in holdings:
        experts = layer_experts(shape["hidden_size"], shape["intermediate_size"], shape["num_experts"], held,
                                dtype, device)
        for rows in args.rows:
            probe = measure_layer(experts, rows, shape, dtype, device, 3, peak, copy_gbs)
            layers.append(measure_layer(experts, rows, shape, dtype, device, calls_for(probe["ms"] / 1e3), peak,
                                        copy_gbs))
        del experts
    return {"device": describe_device(device), "dtype": args.dtype, "preset": args.preset, "shape": shape,
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "matmul": {"size": args.matmul_size, "tflops": _sig(peak)}, "copy_gbs": _sig(copy_gbs),
            "layers": layers}


def table(report: dict) -> str:
    lines = [f"{report['device']}, {report['dtype']}: matmul {report['matmul']['size']}³ "
             f"{report['matmul']['tflops']} TFLOP/s, copy {report['copy_gbs']} GB/s", "",
             "| experts held | rows | ms/layer | TFLOP/s | of matmul peak | weights GB/s | of copy bandwidth |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['held']} of {report['shape']['num_experts']} | {r['rows']} | {r['ms']} | {r['tflops']} | "
              f"{r['peak_fraction']:.1%} | {r['weight_gbs']} | {r['copy_fraction']:.1%} |" for r in report["layers"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--preset", default="bench-m", choices=sorted(PRESETS), help="the expert shape")
    p.add_argument("--hidden", type=int, default=0, help="hidden size instead of the preset's")
    p.add_argument("--ffn", type=int, default=0, help="expert FFN width instead of the preset's")
    p.add_argument("--experts", type=int, default=0, help="experts per layer instead of the preset's")
    p.add_argument("--top-k", type=int, default=0, help="experts per token instead of the preset's")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256, 2048, 8192], help="token rows per layer call")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-calls", type=int, default=10, help="timed calls per round of the peak and the copy")
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--out", type=Path, help="write the JSON here too")
    args = p.parse_args(argv)
    report = run(args)
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
