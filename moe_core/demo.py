"""The built-in demo model: a tiny Mixtral-layout checkpoint, built on the spot and byte-for-byte the same
on every build.

It is a real Hugging Face folder (config, byte-level BPE tokenizer, two safetensors shards with an index),
so the whole serving stack and `transformers` can load it without a download. The tokenizer is trained
on `data/demo_corpus.txt`; the embeddings and lm_head are a low-rank factorisation of that corpus' token
bigram log-probabilities, so sampled text reads like words. Attention and expert weights are small and
random, real enough to exercise routing but too weak to drown the bigram signal.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moe_core.errors import CheckpointError
from moe_core.names import CheckpointNames

DEMO_VERSION = "1"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")  # ids 0..4
UNK, BOS, EOS, INST, END_INST = range(5)
SIZES = dict(vocab=2048, hidden=256, ffn=512, layers=4, heads=8, kv_heads=2, experts=8, top_k=2, max_len=2048)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", INDEX, *SHARDS)
CORPUS = Path(__file__).with_name("data") / "demo_corpus.txt"  # package data, see pyproject.toml
NAMES = CheckpointNames(moe_block="block_sparse_moe", experts=("w1", "w3", "w2"))
SHARPEN = 1.5  # bigram logits x 1.5: samples at temperature 1 mostly follow corpus bigrams, not rare junk

# Mistral-Instruct style: the system message goes in front of the first user turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles, after an optional system message') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


def demo_dir() -> Path:
    """Where the demo model lives: `$MOE_CACHE_DIR` or `~/.cache/moe-serve`, then `demo-v{DEMO_VERSION}`."""
    root = os.environ.get("MOE_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "moe-serve"
    return base / f"demo-v{DEMO_VERSION}"


def ensure_demo_model(target: Path | None = None) -> Path:
    """Build the demo model unless it is already there; return its folder.

    The build goes into a temporary folder beside the target and is renamed into place, so readers never
    see a half-written model, and two racing processes both end up using whichever rename landed first.
    """
    target = Path(target) if target is not None else demo_dir()
    if _is_complete(target):
        return target
    if target.is_dir() and any(target.iterdir()):
        raise _not_a_demo(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_demo_model(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, target)  # atomic; fails if another process put a (non-empty) folder there first
        except OSError:
            if not _is_complete(target):
                raise _not_a_demo(target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_demo_model(target: Path) -> None:
    """Write the demo model's files into `target` (created if missing)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    stories = _read_corpus()
    tokenizer = _train_tokenizer(stories)
    vocab = tokenizer.get_vocab_size()
    _write_tokenizer(tokenizer, target)
    _write_json(target / "config.json", _model_config(vocab))
    _write_json(target / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS})
    gen = torch.Generator().manual_seed(0)
    embed, lm_head = _bigram_embeddings(*_bigram_logprobs(tokenizer, stories), SIZES["hidden"], gen)
    tensors = {NAMES.embed: embed, NAMES.lm_head: lm_head, **_layer_weights(gen)}
    tensors[NAMES.final_norm] = torch.ones(SIZES["hidden"])
    _save_shards(tensors, target)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def _not_a_demo(folder: Path) -> CheckpointError:
    return CheckpointError(f"{folder} exists but is not a complete demo model; remove it to rebuild")


def _read_corpus() -> list[str]:
    text = CORPUS.read_text(encoding="utf-8")
    return [story.strip() for story in text.split("\n\n") if story.strip()]


def _train_tokenizer(stories: list[str]) -> Tokenizer:
    # The BPE trainer is deterministic for a given input (checked by the two-build test).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SIZES["vocab"], special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(stories, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return tokenizer


def write_padded_tokenizer(target: Path, vocab_size: int) -> None:
    """The demo tokenizer, its vocabulary padded with never-merged filler tokens to `vocab_size`.

    Benchmark presets (vocab 32000) need a real tokenizer of their own size; the padding changes
    what ids exist, not how text is split.
    """
    tokenizer = _train_tokenizer(_read_corpus())
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True), vocab_size):
        vocab[f"filler{i}"] = i
    _write_tokenizer(Tokenizer.from_str(json.dumps(data)), target)


def _write_tokenizer(tokenizer: Tokenizer, target: Path) -> None:
    (target / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(target / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS],
        "eos_token": SPECIAL_TOKENS[EOS],
        "unk_token": SPECIAL_TOKENS[UNK],
        "model_max_length": SIZES["max_len"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })


def _model_config(vocab: int) -> dict[str, Any]:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
        "hidden_size": SIZES["hidden"], "intermediate_size": SIZES["ffn"],
        "num_hidden_layers": SIZES["layers"],
        "num_attention_heads": SIZES["heads"], "num_key_value_heads": SIZES["kv_heads"],
        "num_local_experts": SIZES["experts"], "num_experts_per_tok": SIZES["top_k"],
        "max_position_embeddings": SIZES["max_len"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": BOS, "eos_token_id": EOS, "tie_word_embeddings": False, "torch_dtype": "float32",
        "hidden_act": "silu", "sliding_window": None,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _bigram_logprobs(
    tokenizer: Tokenizer, stories: list[str], prior: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-centred log P(next | prev) over the corpus, smoothed towards the unigram distribution, and how
    often each prev token occurs."""
    vocab = tokenizer.get_vocab_size()
    pairs: list[tuple[int, int]] = []
    for story in stories:
        ids = [BOS, *tokenizer.encode(story, add_special_tokens=False).ids, EOS]
        pairs += itertools.pairwise(ids)
        # After [INST] / [/INST] text starts with a space, as the chat template writes it.
        first_spaced = tokenizer.encode(" " + story, add_special_tokens=False).ids[0]
        pairs += [(INST, first_spaced), (END_INST, first_spaced), (EOS, ids[1])]
    flat = torch.tensor([p * vocab + n for p, n in pairs])
    counts = torch.bincount(flat, minlength=vocab * vocab).reshape(vocab, vocab).double()  # [prev, next]
    unigram = (counts.sum(0) + 1) / (counts.sum() + vocab)  # [next], add-one so no token is impossible
    probs = (counts + prior * unigram) / (counts.sum(1, keepdim=True) + prior)
    logp = probs.log()
    return logp - logp.mean(1, keepdim=True), counts.sum(1)


def _bigram_embeddings(
    logp: torch.Tensor, freq: torch.Tensor, hidden: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `logp` [V, V] into embed and lm_head [V, hidden] so that lm_head @ rmsnorm(embed[p]) ∝ logp[p].

    A randomised range finder (fixed start, a few power iterations) gives the top `hidden - 1` directions
    without the sign and rotation freedom of an SVD, so tiny float differences stay tiny. The last
    dimension pads every embedding row to the same norm, so RMSNorm scales all rows alike and the
    bigram logits come out exactly (up to the rank cut), sharp rows sharp and flat rows flat.
    """
    vocab, rank = logp.shape[0], hidden - 1
    weighted = logp * (freq + 1).sqrt()[:, None]  # [V, V]; frequent prev tokens choose the directions
    basis = torch.randn(vocab, rank, generator=gen, dtype=torch.float64)
    for _ in range(4):
        basis, _ = torch.linalg.qr(weighted.T @ (weighted @ basis))  # [V, rank]
    coords = logp @ basis  # [V, rank]: logp ≈ coords @ basis.T
    norms = coords.norm(dim=1, keepdim=True)  # [V, 1]
    top = norms.max()
    pad = (top**2 - norms**2).clamp(min=0).sqrt()  # [V, 1]
    embed = torch.cat([coords, pad], dim=1)  # [V, hidden], every row has norm `top`
    scale = math.sqrt(hidden) / top  # RMSNorm of every row is now the identity
    lm_head = torch.cat([basis * SHARPEN / scale, torch.zeros(vocab, 1, dtype=torch.float64)], dim=1)
    return _round(embed * scale), _round(lm_head)


def _layer_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, f, layers = SIZES["hidden"], SIZES["ffn"], SIZES["layers"]
    head_dim = h // SIZES["heads"]
    q, kv = SIZES["heads"] * head_dim, SIZES["kv_heads"] * head_dim
    # Projections that write the residual stream get a smaller std, so that the four layers move it by ~3%:
    # enough to matter in every logit, too little to drown the bigram signal of the embeddings.
    out_std = 0.02 / (2 * layers)
    tensors = {}
    for layer in range(layers):
        shapes = {"q_proj": (q, h, 0.02), "k_proj": (kv, h, 0.02), "v_proj": (kv, h, 0.02),
                  "o_proj": (h, q, out_std)}
        for proj, (rows, cols, std) in shapes.items():
            tensors[NAMES.attn(layer, proj)] = _normal(gen, rows, cols, std)
        tensors[NAMES.router_gate(layer)] = _normal(gen, SIZES["experts"], h, 0.02)
        for expert in range(SIZES["experts"]):
            tensors[NAMES.expert(layer, expert, 0)] = _normal(gen, f, h, 0.02)
            tensors[NAMES.expert(layer, expert, 1)] = _normal(gen, f, h, 0.02)
            tensors[NAMES.expert(layer, expert, 2)] = _normal(gen, h, f, out_std)
        tensors[NAMES.layer(layer, "input_layernorm.weight")] = torch.ones(h)
        tensors[NAMES.layer(layer, "post_attention_layernorm.weight")] = torch.ones(h)
    return tensors


def _normal(gen: torch.Generator, rows: int, cols: int, std: float) -> torch.Tensor:
    # float64 sampling takes torch's portable scalar path; float32 has an AVX2-only kernel whose bits differ.
    return _round(torch.randn(rows, cols, generator=gen, dtype=torch.float64) * std)


def _round(x: torch.Tensor) -> torch.Tensor:
    """float32 holding bfloat16 values: last-bit differences of BLAS builds vanish, a bf16 copy is exact."""
    return x.to(torch.bfloat16).to(torch.float32).contiguous()


def _save_shards(tensors: dict[str, torch.Tensor], target: Path) -> None:
    weight_map = {name: SHARDS[_shard_of(name)] for name in sorted(tensors)}
    for shard in SHARDS:
        part = {name: tensors[name] for name in sorted(tensors) if weight_map[name] == shard}
        save_file(part, str(target / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(target / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _shard_of(name: str) -> int:
    """Embeddings and the first half of the layers go to shard 0, the rest to shard 1."""
    if name == NAMES.embed:
        return 0
    if name.startswith("model.layers."):
        return int(int(name.split(".")[2]) >= SIZES["layers"] // 2)
    return 1
