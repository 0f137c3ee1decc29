"""Our logits and greedy continuations against `transformers` on tiny random checkpoints of each family."""

from __future__ import annotations

import pytest
import torch

from moe_core.forward import sequence_logits
from moe_core.loader import load_dense_model, load_expert_shard
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.params import SamplingParams
from router_service.expert_backend import LocalExperts
from tests.tiny_models import SHAPES

pytestmark = pytest.mark.reference
transformers = pytest.importorskip("transformers")


def _ours(path):
    model = load_dense_model(path)
    _, experts = load_expert_shard(path, None)
    return model, LocalExperts(experts)


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(SHAPES))
def test_full_sequence_logits_match(tiny_checkpoint, name):
    path = tiny_checkpoint(name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, experts = _ours(path)
    for ids in _prompts(model.cfg.vocab_size, [1, 13, 40]):
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        got = sequence_logits(model, experts, ids)
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{name}: max |diff| {diff:.3g} over {len(ids)} tokens"


@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_continuations_identical(tiny_checkpoint, name):
    path = tiny_checkpoint(name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, experts = _ours(path)
    engine = Engine(model, experts, None, EngineConfig(kv_cache_bytes=4 << 20, block_size=8))
    prompts = _prompts(model.cfg.vocab_size, [3, 11, 24])
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    ours: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            ours[out.request_id] += out.token_ids
    for prompt, request_id in zip(prompts, ids, strict=True):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours[request_id] == expected, f"{name}: prompt of {len(prompt)} tokens diverged"
