"""Generate the Python gRPC code for protos/moe/v1/*.proto into moe_core/pb/.

    python protos/generate.py            # write moe_core/pb/
    python protos/generate.py --check    # exit 1 if moe_core/pb/ is not what the protos generate

The generated modules import each other as `moe.v1`; they are rewritten to `moe_core.pb` so the code
lives in our package. A test runs --check so committed code never drifts from the .proto files.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "moe_core" / "pb"
HEADER = '"""Generated from protos/moe/v1 by protos/generate.py. Do not edit."""\n'


def generate() -> dict[str, str]:
    """File name -> content of every generated module."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "moe" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTOS}", f"-I{_well_known_protos()}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        files = {p.name: p.read_text() for p in sorted((Path(out) / "moe" / "v1").iterdir()) if p.is_file()}
    files = {name: re.sub(r"^from moe\.v1 import", "from moe_core.pb import", text, flags=re.M)
             for name, text in files.items()}
    files["__init__.py"] = HEADER
    return files


def _well_known_protos() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    files = generate()
    if args.check:
        current = {p.name: p.read_text() for p in TARGET.glob("*") if p.is_file()} if TARGET.exists() else {}
        stale = sorted(set(files) ^ set(current) | {n for n in files if current.get(n) != files[n]})
        if stale:
            print(f"moe_core/pb is out of date with protos/: {stale}; run python protos/generate.py")
            return 1
        return 0
    TARGET.mkdir(exist_ok=True)
    for old in TARGET.glob("*"):
        if old.is_file() and old.name not in files:
            old.unlink()
    for name, text in files.items():
        (TARGET / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
