"""Reading tensors from a Hugging Face `*.safetensors` checkpoint, one tensor at a time.

Only the header of each file is read up front; a tensor's bytes are read (through the file's
memory map) when that tensor is asked for. An expert service therefore touches only the bytes of
its own experts, and `touched` records exactly which keys were read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moe_core.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of one model folder, keyed by their checkpoint names."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = self._map_keys()
        self.touched: list[str] = []
        self.bytes_read = 0

    def _map_keys(self) -> dict[str, Path]:
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model folder not found")
        index = self.dir / INDEX_FILE
        if index.exists():
            return self._map_from_index(index)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files and no {INDEX_FILE}")
        mapping: dict[str, Path] = {}
        for path in files:
            for key in self._open(path).keys():  # noqa: SIM118 - a safe_open handle, not a dict
                mapping[key] = path
        return mapping

    def _map_from_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        mapping = {key: self.dir / name for key, name in weight_map.items()}
        for path in sorted(set(mapping.values())):
            if not path.exists():
                raise CheckpointError(f"{index}: lists {path.name}, which does not exist")
        return mapping

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc
            self._handles[path] = handle
        return handle

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self) -> Iterable[str]:
        return self.file_of.keys()

    def _locate(self, key: str) -> Path:
        path = self.file_of.get(key)
        if path is None:
            raise CheckpointError(f"{self.dir}: tensor '{key}' not found in the checkpoint")
        return path

    def shape(self, key: str) -> list[int]:
        path = self._locate(key)
        return list(self._open(path).get_slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        path = self._locate(key)
        view = self._open(path).get_slice(key)
        numel = 1
        for dim in view.get_shape():
            numel *= dim
        return numel * _DTYPE_SIZES.get(view.get_dtype(), 4)

    def read(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             index: int | slice | tuple[int | slice, ...] | None = None) -> torch.Tensor:
        """One tensor, or the part of it that `index` selects (only those bytes are read), converted to
        `dtype` on `device`."""
        path = self._locate(key)
        try:
            handle = self._open(path)
            tensor = handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor '{key}' ({exc})") from exc
        self.touched.append(key if index is None else f"{key}[{index}]")
        self.bytes_read += tensor.numel() * tensor.element_size()
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def expect_shape(self, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.file_of.get(key, self.dir)}: tensor '{key}' has shape {list(tensor.shape)}, "
                f"config.json implies {list(shape)}"
            )
        return tensor


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
