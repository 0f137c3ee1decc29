"""`moe-serve generate`: answer one prompt with the one-process engine, streaming to the terminal."""

from __future__ import annotations

import argparse
import sys

from moe_core.demo import ensure_demo_model
from router_service.engine.engine import EngineConfig
from router_service.engine.loop import EngineLoop
from router_service.engine.params import SamplingParams
from router_service.local import build_local_engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text (a user message with --chat)")
    p.add_argument("--model", help="model folder (Hugging Face layout); default: the built-in demo model")
    p.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV-cache budget")


def run(args: argparse.Namespace) -> int:
    model_dir = args.model or ensure_demo_model()
    engine, tokenizer = build_local_engine(model_dir, args.dtype, args.device,
                                           EngineConfig(kv_cache_bytes=args.kv_cache_mib << 20))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    if not args.chat:
        sys.stdout.write(args.prompt)
    reason, generated = None, 0
    with EngineLoop(engine) as loop:
        for out in loop.stream(prompt_ids, params):
            sys.stdout.write(out.text)
            sys.stdout.flush()
            generated = out.completion_tokens
            if out.error:
                print(f"\nerror: {out.error}", file=sys.stderr)
                return 1
            reason = out.finish_reason
    sys.stdout.write("\n")
    print(f"[{len(prompt_ids)} prompt tokens, {generated} generated, finish: {reason}]", file=sys.stderr)
    return 0
