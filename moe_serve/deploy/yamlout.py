"""A small, deterministic YAML writer for generated manifests (block style, keys in the order given).

Plain scalars only where every YAML 1.1 and 1.2 reader (PyYAML in docker-compose, kustomize, kubectl)
reads them back as the same string; anything else is double-quoted JSON, which is valid YAML. Multi-line
text becomes a literal block (`|`) when that round-trips exactly, else a quoted string.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./=@+:-]*(?<!:)$")
# Words YAML 1.1 (PyYAML, docker-compose) reads as booleans or null.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
# Characters a YAML reader refuses or treats as line breaks inside quotes: written as escapes.
_ESCAPE = re.compile("[^\x09\x0a\x0d\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
INDENT = "  "


def scalar(value: Any) -> str:
    """One scalar as YAML text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if not isinstance(value, str):
        raise TypeError(f"cannot write {type(value).__name__} as YAML")
    if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
        return value
    quoted = json.dumps(value, ensure_ascii=False)
    return _ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


def _block(text: str) -> str | None:
    """The `|` header for multi-line text that a literal block keeps byte for byte, or None."""
    if "\n" not in text.rstrip("\n") or _ESCAPE.search(text) or any(c in text for c in "\t\r\ufeff"):
        return None
    lines = text.split("\n")
    first = next((line for line in lines if line), "")
    if first[:1] == " " or any(line != line.rstrip(" ") for line in lines):
        return None
    stripped = text.rstrip("\n")
    trailing = len(text) - len(stripped)
    return {0: "|-", 1: "|"}.get(trailing)


def _lines(value: Any, depth: int) -> list[str]:
    """`value` (a dict or list) as block lines indented by `depth` levels."""
    pad = INDENT * depth
    out: list[str] = []
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    for key, item in items:
        head = f"{pad}{scalar(key)}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, dict | list) and item:
            if isinstance(value, list):
                nested = _lines(item, depth + 1)
                out.append(f"{head} {nested[0].lstrip()}")
                out += nested[1:]
            else:
                out.append(head)
                out += _lines(item, depth + 1)
        elif isinstance(item, dict | list):
            out.append(f"{head} {'{}' if isinstance(item, dict) else '[]'}")
        elif isinstance(item, str) and (header := _block(item)):
            out.append(f"{head} {header}")
            inner = INDENT * (depth + 1)
            out += [f"{inner}{line}" if line else "" for line in item.rstrip("\n").split("\n")]
        else:
            out.append(f"{head} {scalar(item)}")
    return out


def dump(document: dict | list) -> str:
    """One YAML document (a mapping or a sequence)."""
    if not document:
        return ("{}" if isinstance(document, dict) else "[]") + "\n"
    return "\n".join(_lines(document, 0)) + "\n"


def dump_all(documents: list[dict]) -> str:
    """Several documents, separated by `---`."""
    return "---\n".join(dump(d) for d in documents)
