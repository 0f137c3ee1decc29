"""Building a one-process engine (experts in this process) from a model folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from moe_core.checkpoint import Checkpoint
from moe_core.dtypes import resolve_device, resolve_dtype
from moe_core.loader import load_dense_model
from moe_core.tokenizer import Tokenizer
from moe_core.weights import load_experts
from router_service.engine.engine import Engine, EngineConfig
from router_service.expert_backend import LocalExperts

log = logging.getLogger(__name__)


def build_local_engine(model_dir: str | Path, dtype: str = "auto", device: str = "auto",
                       config: EngineConfig | None = None) -> tuple[Engine, Tokenizer]:
    started = time.perf_counter()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    ckpt = Checkpoint(model_dir)
    model = load_dense_model(model_dir, torch_dtype, device, ckpt)
    experts = load_experts(ckpt, model.cfg, None, torch_dtype, device)
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine(model, LocalExperts(experts), tokenizer, config)
    log.info("loaded %s (%s, %s, %s) in %.1fs; KV cache %d tokens", model_dir, model.cfg.model_type,
             torch_dtype, device, time.perf_counter() - started, engine.kv.capacity_tokens)
    return engine, tokenizer
