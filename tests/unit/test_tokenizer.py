"""Tokenizer and IncrementalDetokenizer against transformers' AutoTokenizer as the reference."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from moe_core.demo import build_demo_model
from moe_core.errors import TokenizerError
from moe_core.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "", "Hello world", "The router sends each token to two experts.", "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines", "Ünïcödé çafé, 日本語のテキスト, 😀🚢⛰️ emoji",
    "[INST] inside text [/INST]</s><s>",
    "numbers 1234567890 and punctuation!?;:…", "<|end|> marker", "x" * 300,
]
# Tools and features a real template uses: tojson with indent, loop controls, namespace, {% generation %}.
LIST_TEMPLATES = [
    {"name": "default", "template": (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "<|{{ m.role }}|>{% generation %}{{ m.content }}{% endgeneration %}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")},
    {"name": "tool_use", "template": (
        "{% set ns = namespace(n=0) %}{{ bos_token }}<tools>{{ tools | tojson(indent=2) }}</tools>"
        "{% for m in messages %}{% set ns.n = ns.n + 1 %}[{{ ns.n }}:{{ m.role }}] {{ m.content }}"
        "{% if m.reasoning_content %}(thought: {{ m.reasoning_content }}){% endif %}\n{% endfor %}"
        "{{ pad_token }}{{ custom | default('none') }}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Wetter für einen Ort",
                                           "parameters": {"type": "object", "properties": {}}}}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do rivers go?"},
        {"role": "assistant", "content": "To the sea."}, {"role": "user", "content": "And ships?"}]
SPLIT_TEXT = "😀 日本 ⛰️ é ∑"  # multi-byte characters that byte-level tokens split


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    build_demo_model(path)
    return path


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different tokenizer: sentencepiece-style BPE with byte fallback and AddedToken dicts."""
    path = tmp_path_factory.mktemp("llama_like")
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|end|>"],
                                  show_progress=False)
    backend.train_from_iterator(["Mountains are slow rivers. The ferryman crossed the wide river. " * 4,
                                 "Routers send tokens to experts, and experts send answers back."], trainer)
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces, as sentencepiece models have them
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]).__getstate__())
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    # transformers ignores these flags when there is a tokenizer.json; the parity tests check we do too.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": True,
              "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False},
              "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False},
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "chat_template": LIST_TEMPLATES}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3, 2]}), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["demo", "llama_like"])
def pair(request: pytest.FixtureRequest, demo_path: Path, llama_path: Path) -> tuple[Tokenizer, object]:
    path = demo_path if request.param == "demo" else llama_path
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.reference
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair: tuple[Tokenizer, object], text: str) -> None:
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == ref(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.reference
def test_special_tokens_match_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, ref = pair
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_ids[0] == ref.eos_token_id
    assert ours.special_ids == {i for i, token in ref.added_tokens_decoder.items() if token.special}
    assert ours.encode("hi")[0] == ref.bos_token_id  # both tokenizers prepend BOS


def test_eos_ids_merge_generation_config(demo_path: Path, llama_path: Path) -> None:
    assert Tokenizer.from_dir(demo_path).eos_token_ids == (2,)
    # The config's </s> first, then generation_config's ids, without repeats.
    assert Tokenizer.from_dir(llama_path).eos_token_ids == (2, 3)


@pytest.mark.reference
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_demo_chat_template_matches_transformers(demo_path: Path, system: bool,
                                                 add_generation_prompt: bool) -> None:
    ours, ref = Tokenizer.from_dir(demo_path), transformers.AutoTokenizer.from_pretrained(demo_path)
    messages = CHAT if system else CHAT[1:]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False)
    assert text.startswith("<s>[INST] ") and text.endswith(" [/INST]")
    # The rendered text holds its BOS, so callers encode it without adding another, as transformers does.
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ours.encode(text, add_special_tokens=False) == list(getattr(expected, "input_ids", expected))


@pytest.mark.reference
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_features_match_transformers(llama_path: Path, tools: list | None,
                                              add_generation_prompt: bool) -> None:
    ours, ref = Tokenizer.from_dir(llama_path), transformers.AutoTokenizer.from_pretrained(llama_path)
    messages = [*CHAT, {"role": "skip", "content": "hidden"},
                {"role": "assistant", "content": "Ja", "reasoning_content": "think", "tool_calls": None}]
    for extra in ({}, {"custom": "x"}):
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        **extra)
        assert text == ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               tools=tools, tokenize=False, **extra)
    assert "<|end|>" in text or "<tools>" in text


def test_template_errors_become_tokenizer_errors(demo_path: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(demo_path)
    with pytest.raises(TokenizerError, match="alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((demo_path / "tokenizer.json").read_bytes())
    (broken / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(TokenizerError, match="endfor"):
        Tokenizer.from_dir(broken).apply_chat_template(CHAT)
    (broken / "tokenizer_config.json").write_text("{}")
    plain = Tokenizer.from_dir(broken)
    assert not plain.has_chat_template
    with pytest.raises(TokenizerError, match="has no chat template"):
        plain.apply_chat_template(CHAT)


def test_missing_or_corrupt_files_name_the_path(demo_path: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((demo_path / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


def test_token_text(demo_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(demo_path)
    (the,) = tokenizer.encode(" the", add_special_tokens=False)
    assert tokenizer.token_text(the) == " the"
    assert tokenizer.token_text(tokenizer.eos_token_ids[0]) == "</s>"
    assert tokenizer.token_text(tokenizer.encode("😀", add_special_tokens=False)[0]) == "\ufffd"


def _random_output(tokenizer: Tokenizer, rng: random.Random, raw_ids: bool = True) -> list[int]:
    """Multi-byte characters split over byte tokens (with raw_ids sometimes cut short), special tokens, and
    with raw_ids any ids at all."""
    ids: list[int] = []
    for _ in range(rng.randrange(1, 12)):
        kind = rng.random()
        if kind < 0.1:
            ids.append(rng.choice(sorted(tokenizer.special_ids)))
        elif kind < 0.6 or not raw_ids:
            text = rng.choice(SPLIT_TEXT) + rng.choice(["", " the", "a"])
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece[:-1] if raw_ids and rng.random() < 0.3 else piece
        else:
            ids += [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 4))]
    return ids


def _stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], skip: bool) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in output] + [detok.flush()]
    assert detok.text == "".join(deltas)
    return detok.text, deltas


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode(demo_path: Path, skip: bool) -> None:
    tokenizer = Tokenizer.from_dir(demo_path)
    rng = random.Random(1234)
    prompts = [[], tokenizer.encode("The river"), tokenizer.encode("Emoji 😀"), tokenizer.encode("日本")[:-1]]
    for _ in range(400):
        prompt, output = rng.choice(prompts), _random_output(tokenizer, rng)
        text, _ = _stream(tokenizer, prompt, output, skip)
        assert text == tokenizer.decode(output, skip_special_tokens=skip), (prompt, output)


def test_incremental_holds_back_split_characters(demo_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(demo_path)
    output = tokenizer.encode(" 😀!", add_special_tokens=False)
    assert len(output) >= 4  # the demo corpus is ASCII, so the emoji is one token per byte
    _, deltas = _stream(tokenizer, tokenizer.encode("Hi"), output, skip=True)
    assert "".join(deltas) == " 😀!"
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in [d.strip("! ") for d in deltas]  # released in one piece once its last byte arrived
    _, deltas = _stream(tokenizer, [], output[:-2], skip=True)  # stops inside the character
    assert deltas[-1].endswith("\ufffd")  # flush() gives what a full decode shows


def test_incremental_keeps_context_spaces(llama_path: Path) -> None:
    # Sentencepiece decoders drop the first token's leading space; the prompt tail keeps it in context.
    tokenizer = Tokenizer.from_dir(llama_path)
    prompt = tokenizer.encode("The ferryman")
    output = tokenizer.encode("The ferryman crossed the river 😀")[len(prompt):]
    text, _ = _stream(tokenizer, prompt, output, skip=True)
    assert text == " crossed the river 😀"
    assert tokenizer.decode(output) == "crossed the river 😀"
    # Only text a tokenizer can produce: a ByteFallback decoder turns a whole byte run into U+FFFD once any
    # byte of it is invalid, so for random ids a full decode can take back characters already streamed.
    rng = random.Random(7)
    for _ in range(200):
        output = _random_output(tokenizer, rng, raw_ids=False)
        text, _ = _stream(tokenizer, prompt, output, skip=True)
        assert tokenizer.decode(prompt + output) == tokenizer.decode(prompt) + text, output
