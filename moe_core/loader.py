"""Loading a model folder: its config, dense weights and (some or all of) its experts."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from moe_core.checkpoint import Checkpoint
from moe_core.config import MoeConfig, load_config
from moe_core.model import DenseModel
from moe_core.weights import LayerExperts, load_dense, load_experts


def load_dense_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                     ckpt: Checkpoint | None = None) -> DenseModel:
    cfg = load_config(model_dir)
    ckpt = ckpt or Checkpoint(model_dir)
    return DenseModel.build(cfg, load_dense(ckpt, cfg, dtype, device))


def load_expert_shard(model_dir: str | Path, pairs: Iterable[tuple[int, int]] | None,
                      dtype: torch.dtype = torch.float32, device: str = "cpu",
                      ckpt: Checkpoint | None = None) -> tuple[MoeConfig, dict[int, LayerExperts]]:
    """The experts in `pairs` (every expert when None) and nothing else."""
    cfg = load_config(model_dir)
    ckpt = ckpt or Checkpoint(model_dir)
    return cfg, load_experts(ckpt, cfg, pairs, dtype, device)
