"""What the expert-output cache adds to a layer step when nothing repeats: its keys, lookups and stores.

    python -m bench.cache_cost --rows 1 32 512 --dtype bfloat16
    PYTHONPATH=<older checkout> python -m bench.cache_cost ...   # the same against another revision

Drives `CachedExperts` (local tier; `--mode redis` adds the Redis tier at `--redis`) in front of a backend
that returns its input at once, over fresh random rows of bench-s's width, 8 MoE layers a step, one
torch thread as in the router's engine thread. Prints µs per row and per layer step for the cache and
for the bare backend; `--python-index` (MOE_ROW_CACHE=0) runs the cache's Python index, not the native one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from moe_core.forward import ExpertCall
from router_service.cache import CacheConfig
from router_service.cached_experts import CachedExperts
from router_service.expert_backend import ExpertBackend

LAYERS = 8


class Echo(ExpertBackend):
    """Experts that cost nothing: the cache's own work is all that is timed."""

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x.clone()


def steps(rows: int, count: int, hidden: int, dtype: torch.dtype, decode: bool, seed: int) -> list[list[ExpertCall]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(count):
        x = torch.randn(rows, hidden, generator=g).to(dtype)
        weights, ids = torch.rand(rows, 2, generator=g), torch.randint(0, 8, (rows, 2), generator=g)
        out.append([ExpertCall(layer, x, weights, ids, num_decode=rows if decode else 0, step_id=step)
                    for layer in range(LAYERS)])
    return out


def timed(backend: ExpertBackend, work: list[list[ExpertCall]]) -> float:
    started = time.perf_counter()
    for step in work:
        for call in step:
            backend.submit(call).result()
    return time.perf_counter() - started


def measure(rows: int, args: argparse.Namespace) -> dict[str, float | int | str]:
    dtype = getattr(torch, args.dtype)
    count = max(20, args.row_budget // rows)
    config = CacheConfig(mode=args.mode, redis_url=args.redis, local_bytes=args.local_mib << 20,
                         prefix=f"cache-cost{time.time_ns()}")
    cache = CachedExperts(Echo(), config, "rev", None, moe_layers=range(LAYERS))
    cache.reserve(args.hidden, dtype)
    warm = steps(rows, 5, args.hidden, dtype, rows <= 64, seed=1)
    timed(cache, warm)
    work = steps(rows, count, args.hidden, dtype, rows <= 64, seed=2)  # decode-sized steps are decode rows
    bare, cached = timed(Echo(), work), timed(cache, work)
    cache.close()
    calls, total_rows = count * LAYERS, count * LAYERS * rows
    native = getattr(cache.local, "native", None)  # None: a revision before the native index
    return {"rows": rows, "mode": args.mode, "index": {True: "native", False: "python", None: "dict"}[native],
            "layer_steps": calls, "cache_us_per_row": round(1e6 * (cached - bare) / total_rows, 3),
            "cache_us_per_layer_step": round(1e6 * (cached - bare) / calls, 1),
            "backend_us_per_layer_step": round(1e6 * bare / calls, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 512])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--hidden", type=int, default=512, help="row width (bench-s: 512)")
    parser.add_argument("--mode", choices=["local", "redis"], default="local")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--local-mib", type=int, default=256)
    parser.add_argument("--row-budget", type=int, default=20_000, help="rows per size, about")
    parser.add_argument("--python-index", action="store_true", help="the cache's Python fallback, not its native index")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.python_index:
        os.environ["MOE_ROW_CACHE"] = "0"
    for rows in args.rows:
        print(json.dumps(measure(rows, args)), flush=True)


if __name__ == "__main__":
    main()
