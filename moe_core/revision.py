"""A model's revision: a content hash that every process serving the same checkpoint agrees on.

It hashes config.json and the header of every safetensors file (names, dtypes, shapes, offsets,
and the header's metadata), not the gigabytes of weights; two different checkpoints of the same
shape still differ in their config or, for fine-tunes saved separately, in nothing at all, so a
user may also pin a revision by setting it explicitly.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from moe_core.errors import CheckpointError


def model_revision(model_dir: str | Path) -> str:
    folder = Path(model_dir)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: file not found")
    digest.update(config.read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(_header(path))
    return digest.hexdigest()[:16]


def _header(path: Path) -> bytes:
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 2**20:
            raise CheckpointError(f"{path}: header of {length} bytes is not plausible")
        return f.read(length)
