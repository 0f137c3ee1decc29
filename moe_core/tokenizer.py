"""Text to token ids and back with a model's `tokenizer.json`, chat templates, and streaming detokenization.

`transformers` is the reference: `encode`, `decode` and `apply_chat_template` give what
`AutoTokenizer.from_pretrained(model_dir)` gives on the same folder, using only the `tokenizers` library
and Jinja2. The folder's files are read the way transformers reads them: `tokenizer_config.json` for the
special tokens and the chat template (or `chat_template.jinja`), `special_tokens_map.json` as the legacy
fallback, and `generation_config.json` for extra end-of-sequence ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from moe_core.errors import TokenizerError

SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SEED_TOKENS = 5  # prompt tokens decoded before the output (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A model's tokenizer: encode/decode, special tokens, end-of-sequence ids and the chat template."""

    def __init__(self, backend: Backend, config: dict[str, Any], chat_templates: dict[str, str],
                 generation_eos: Sequence[int], source: str):
        self.source = source
        self._backend = backend
        self._templates = chat_templates
        is_bpe = type(backend.model).__name__ == "BPE"
        self._cleanup = bool(config.get("clean_up_tokenization_spaces")) and not is_bpe
        self.special_tokens = {attr: _content(config[attr]) for attr in SPECIAL_ATTRS if config.get(attr)}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        eos_id = None if self.eos_token is None else backend.token_to_id(self.eos_token)
        self.eos_token_ids = tuple(dict.fromkeys(([] if eos_id is None else [eos_id]) + list(generation_eos)))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        folder = Path(model_dir)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: file not found")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON or unknown components
            raise TokenizerError(f"{path}: cannot load tokenizer ({exc})") from exc
        config = _read_json(folder / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # transformers reads the legacy map only in this case
            config.update(_read_json(folder / "special_tokens_map.json"))
        _prepare_backend(backend, config)
        generation_eos = _eos_ids(folder / "generation_config.json")
        return cls(backend, config, _chat_templates(folder, config), generation_eos, str(folder))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._cleanup else text

    def token_text(self, token_id: int) -> str:
        """One token's text on its own, as shown next to logprobs (a partial character shows as U+FFFD)."""
        return self._backend.decode([token_id], skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, **extra: Any) -> str:
        """Render `messages` to prompt text; encode that with add_special_tokens=False (it holds the BOS)."""
        template = self._pick_template(tools)
        if not messages:
            raise TokenizerError(f"{self.source}: cannot apply the chat template to an empty conversation")
        # Like transformers: keys set to None are dropped (many templates print "None" otherwise), and the
        # template sees plain copies only, never the caller's objects.
        chat = _alias_reasoning([{k: v for k, v in m.items() if v is not None} for m in _plain(messages)])
        variables = {**self.special_tokens, **_plain(extra)}
        documents = variables.pop("documents", None)
        try:  # a syntax error, raise_exception() in the template, or a bad value in the messages
            return _compile(template).render(messages=chat, tools=_plain(tools), documents=documents,
                                             add_generation_prompt=add_generation_prompt, **variables)
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise TokenizerError(f"{self.source}: chat template failed: {exc}") from exc

    def _pick_template(self, tools: list | None) -> str:
        if not self._templates:
            raise TokenizerError(f"{self.source} has no chat template")
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" not in self._templates:
            raise TokenizerError(f"{self.source}: several chat templates and none named 'default': "
                                 f"{sorted(self._templates)}")
        return self._templates["default"]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, O(1) per token (no full re-decode).

    vLLM's technique: decode a short window of recent tokens twice, without and with the new token,
    and emit the difference. The window starts with the last prompt tokens so that the first output
    token decodes in context (a leading space stays a space). Text ending in U+FFFD is an incomplete
    UTF-8 character and is held back until the next token completes it. For byte-level BPE the deltas
    add up to `decode(output_ids)`; a ByteFallback (sentencepiece) decoder differs only on invalid UTF-8,
    where a full decode also blanks the valid bytes of the same run that were already streamed.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        tail = prompt_ids[-4 * SEED_TOKENS:]  # only the end of a long prompt matters
        seed = [i for i in tail if not (skip_special_tokens and i in tokenizer.special_ids)][-SEED_TOKENS:]
        if seed and tokenizer.decode(seed, skip_special_tokens).endswith("\ufffd"):
            seed = []  # a prompt that stops inside a character would glue onto the output's first bytes
        self._ids = seed  # the window: ids[:read] are context already emitted, ids[read:] are held back
        self._read = len(seed)
        self._prefix_text = tokenizer.decode(seed, skip_special_tokens)
        self._text = ""

    def push(self, token_id: int) -> str:
        """Add one output token; return the new text it completes (often "" while a character is split)."""
        if self._skip and token_id in self._tokenizer.special_ids:
            return ""
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids, self._skip)
        if len(full) <= len(self._prefix_text) or full.endswith("\ufffd"):
            return ""
        return self._emit(full)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD, as in a full decode)."""
        full = self._tokenizer.decode(self._ids, self._skip)
        return self._emit(full) if len(full) > len(self._prefix_text) else ""

    @property
    def text(self) -> str:
        return self._text

    def _emit(self, full: str) -> str:
        delta = full[len(self._prefix_text):]
        # The held-back tokens become the context window for the next push; older ids are dropped.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids, self._skip)
        self._text += delta
        return delta


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _content(token: str | dict) -> str:
    """Special tokens are strings or AddedToken dicts ({"content": ..., "lstrip": ...})."""
    return token["content"] if isinstance(token, dict) else str(token)


def _added_token(token: str | dict) -> AddedToken:
    if isinstance(token, str):
        return AddedToken(token, special=True, normalized=False)
    fields = {k: v for k, v in token.items() if k in ("single_word", "lstrip", "rstrip", "normalized")}
    return AddedToken(token["content"], special=True, **fields)


def _prepare_backend(backend: Backend, config: dict[str, Any]) -> None:
    """Apply what transformers changes on top of tokenizer.json when it loads a folder."""
    # Encoding one text never truncates or pads, whatever tokenizer.json says.
    backend.no_truncation()
    backend.no_padding()
    named = [config[attr] for attr in SPECIAL_ATTRS if config.get(attr)]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    tokens = named + (list(extra) if isinstance(extra, list) else [])
    if tokens:  # every named special token becomes a special added token (skipped by decode, never split)
        backend.add_special_tokens([_added_token(t) for t in tokens])
    # add_bos_token / add_eos_token are left alone on purpose: transformers 5 drops them whenever there is a
    # tokenizer.json, whose post-processor alone decides whether BOS/EOS are added.


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    templates = config.get("chat_template")
    if isinstance(templates, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        found = {t["name"]: t["template"] for t in templates}
    else:
        found = {"default": templates} if isinstance(templates, str) else {}
    jinja_file = folder / "chat_template.jinja"  # newer transformers save it here; it wins over the config
    if jinja_file.is_file():
        found["default"] = jinja_file.read_text(encoding="utf-8")
    return found


def _eos_ids(path: Path) -> list[int]:
    value = _read_json(path).get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{path}: eos_token_id must be an int or a list of ints, got {value!r}")
    return ids


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (it applies it to WordPiece-style tokenizers only)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _plain(value: Any) -> Any:
    """A copy built of plain JSON types (transformers does the same before a template may see it)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base in (bool, int, float, str):  # enums, numpy scalars: back to the base type
        if isinstance(value, base):
            return base(value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Templates read a message's reasoning as `reasoning_content` (or `thinking`, gpt-oss); fill both.
    out = []
    for message in chat:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks assistant text; here it renders as is."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's own filter: no HTML escaping, and indent/separators as in json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Jinja set up as transformers' chat_template_utils sets it up, compiled once per template text."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
