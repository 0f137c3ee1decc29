"""Max |logit diff| against `transformers` for every tiny test shape (float32), for the record.

    python -m bench.parity
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from moe_core.forward import sequence_logits
from moe_core.loader import load_dense_model, load_expert_shard
from router_service.expert_backend import LocalExperts
from tests.tiny_models import SHAPES, make_checkpoint


def main() -> None:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHAPES:
            path = make_checkpoint(name, Path(tmp) / name)
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            model = load_dense_model(path)
            experts = LocalExperts(load_expert_shard(path, None)[1])
            worst = 0.0
            for length in (1, 16, 64, 200):
                ids = torch.randint(3, model.cfg.vocab_size, (length,), generator=g).tolist()
                with torch.no_grad():
                    expected = ref(torch.tensor([ids])).logits[0]
                worst = max(worst, (sequence_logits(model, experts, ids) - expected).abs().max().item())
            print(f"{name:40s} max|diff| {worst:.2e}")


if __name__ == "__main__":
    main()
