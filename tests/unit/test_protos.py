"""The committed generated code in moe_core/pb is exactly what protos/ generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rpc_and_field_is_commented():
    for proto in (ROOT / "protos" / "moe" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            declares = stripped.startswith("rpc ") or (
                "=" in stripped and stripped.endswith(";") and not stripped.startswith(("syntax", "package", "option"))
                and not stripped.split()[0].isupper())
            if declares:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment: {stripped}"
