"""One-process engine vs `transformers.generate` on the same checkpoint and prompts, in one run.

    python -m bench.engine_vs_transformers --preset bench-s --batches 1 32 --prompt-len 128 --new-tokens 128

Prints and writes JSON: output tokens/s for each batch size, for both. Greedy, fixed lengths
(ignore EOS), so both sides generate exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
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


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(o.token_ids) for o in engine.step())
    assert generated == len(prompts) * new_tokens
    return generated / (time.perf_counter() - started)


def run_transformers(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="bench-s")
    p.add_argument("--model-dir", type=Path, default=Path("bench/out/models"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=Path("bench/out/engine_vs_transformers.json"))
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    path = make_bench_model(args.preset, args.model_dir / args.preset)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ckpt = Checkpoint(path)
    model = load_dense_model(path, dtype, ckpt=ckpt)
    experts = LocalExperts(load_experts(ckpt, model.cfg, None, dtype))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    results = {"preset": args.preset, "dtype": args.dtype, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "runs": []}
    for batch in args.batches:
        prompts = prompts_for(batch, args.prompt_len, model.cfg.vocab_size)
        engine = Engine(model, experts, None, EngineConfig(kv_cache_bytes=2 << 30, max_num_seqs=max(64, batch)))
        run_engine(engine, prompts[:1], 4)  # warm-up
        ours = run_engine(engine, prompts, args.new_tokens)
        theirs = run_transformers(reference, prompts, args.new_tokens)
        row = {"batch": batch, "engine_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
               "ratio": round(ours / theirs, 2)}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
