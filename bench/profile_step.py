"""Time one-process engine steps on a bench preset and show where a decode step spends its time.

    python -m bench.profile_step --preset bench-s --batch 32 --prompt-len 256 [--dtype bfloat16] [--profile]
    python -m bench.profile_step --batch 32 --min-prompt-len 32 --prompt-len 512   # mixed context lengths
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.models import make_bench_model
from moe_core.checkpoint import Checkpoint
from moe_core.loader import load_dense_model
from moe_core.weights import load_experts
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.expert_backend import LocalExperts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="bench-s")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--min-prompt-len", type=int, default=None,
                   help="draw each prompt's length from [this, --prompt-len] (default: all --prompt-len)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled")
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top ops of 5 steps")
    args = p.parse_args()
    path = make_bench_model(args.preset, Path("bench/out/models") / args.preset)
    ckpt = Checkpoint(path)
    dtype = getattr(torch, args.dtype)
    model = load_dense_model(path, ckpt=ckpt, dtype=dtype)
    engine = Engine(model, LocalExperts(load_experts(ckpt, model.cfg, None, dtype)), None,
                    EngineConfig(kv_cache_bytes=2 << 30, max_num_seqs=max(64, args.batch)))
    g = torch.Generator().manual_seed(0)
    low = args.prompt_len if args.min_prompt_len is None else args.min_prompt_len
    for _ in range(args.batch):
        length = int(torch.randint(low, args.prompt_len + 1, (1,), generator=g))
        engine.add_request(torch.randint(5, model.cfg.vocab_size, (length,), generator=g).tolist(),
                           SamplingParams(max_tokens=args.steps + 10, temperature=args.temperature, ignore_eos=True))
    started, prefill_tokens = time.perf_counter(), 0
    while not engine.scheduler.running or engine.last_step_tokens != args.batch:
        engine.step()
        prefill_tokens += engine.last_step_tokens
    prefill = time.perf_counter() - started
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    print(f"prefill {prefill_tokens} tokens in {prefill:.2f}s ({prefill_tokens / prefill:.0f} tok/s); "
          f"decode step at batch {args.batch}: median {1e3 * statistics.median(times):.1f} ms "
          f"({args.batch / statistics.median(times):.0f} tok/s)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
