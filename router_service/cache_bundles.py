"""Redis entries of the expert-output cache: one per token, holding that token's rows of every MoE layer.

A step's token that neither tier held at the step's first MoE layer is written once, when the step's
last MoE layer is done, under the key of its first-layer row. The value is the token's rows of all the
MoE layers side by side: a magic, the layers, each layer's key digest and each layer's output row.

A router that finds such a value at a step's first layer puts every layer's row into its local tier
under that layer's own key, so a later layer hits only where its input bytes hash to the key stored:
exactness stays per layer, as with a key per row. Redis meanwhile sees one SET per token instead of one
per layer, and a repeated step costs one round trip instead of one per layer. Per-row SETs cost the
shared cores more than the cache saved (bench/RESULTS.md, "One Redis entry per token").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router_service.row_keys import hex_of

MAGIC = b"MOE\x01"  # the format: a value of any other shape (an older router's, anything else) is garbage
DIGEST = 32  # hex characters of a key's digest: a key is its head ("prefix:revision:layer:") and these


class BundleFormat:
    """The layout of one token's value: MAGIC, layers int32 [n], digests [n, 32] ASCII, rows [n, row_bytes]."""

    def __init__(self, layers: Sequence[int], row_bytes: int):
        self.layers, self.row_bytes = tuple(layers), row_bytes
        n = len(self.layers)
        self.head = MAGIC + np.asarray(self.layers, dtype="<i4").tobytes()
        self._digests_at = len(self.head)
        self._rows_at = self._digests_at + DIGEST * n
        self.size = self._rows_at + row_bytes * n

    def empty(self, count: int) -> np.ndarray:
        """[count, size] uint8 values with their heads written; fill() writes each layer's part."""
        values = np.empty((count, self.size), dtype=np.uint8)
        values[:, :self._digests_at] = np.frombuffer(self.head, dtype=np.uint8)
        return values

    def fill_rows(self, values: np.ndarray, position: int, rows: np.ndarray) -> None:
        """The row of layer number `position` (of self.layers) of each value."""
        at = self._rows_at + self.row_bytes * position
        values[:, at:at + self.row_bytes] = rows

    def fill_digests(self, values: np.ndarray, digests: np.ndarray) -> None:
        """Every layer's hex key digest of each value: [values, 32 × layers] ASCII, the layers in order."""
        values[:, self._digests_at:self._rows_at] = digests

    def valid(self, value: bytes, key: str) -> bool:
        """Whether `value` is this format's value for the first-layer key `key`."""
        return (len(value) == self.size and value.startswith(self.head)
                and value[self._digests_at:self._digests_at + DIGEST] == key[-DIGEST:].encode("ascii"))

    def digests(self, values: np.ndarray, position: int) -> np.ndarray:
        """[values, 32] ASCII: the hex key digest of layer number `position` of each value, a view."""
        at = self._digests_at + DIGEST * position
        return values[:, at:at + DIGEST]

    def rows(self, values: np.ndarray, position: int) -> np.ndarray:
        """[values, row_bytes]: the rows of layer number `position`, a view."""
        at = self._rows_at + self.row_bytes * position
        return values[:, at:at + self.row_bytes]


class StepBundles:
    """The values being gathered for one step: its rows that no tier held at the first MoE layer."""

    def __init__(self, step_id: int, form: BundleFormat, rows: np.ndarray, keys: list[str]):
        self.step_id, self.form = step_id, form
        self.rows, self.keys = rows, keys  # step rows, and their first-layer keys (the Redis keys)
        self.values = form.empty(len(rows))
        self.digests = np.empty((len(rows), len(form.layers), DIGEST // 2), dtype=np.uint8)  # binary, until done
        self.filled: set[int] = set()

    def fill(self, position: int, digests: np.ndarray, rows: np.ndarray) -> None:
        """Layer number `position` of each value: its key's digest ([n, 16] binary) and its row."""
        self.digests[:, position] = digests
        self.form.fill_rows(self.values, position, rows)
        self.filled.add(position)

    @property
    def complete(self) -> bool:
        return len(self.filled) == len(self.form.layers)

    def finished(self) -> np.ndarray:
        """The values, every layer's digest written in hex: one conversion for the step, not one per layer."""
        n, layers = len(self.rows), len(self.form.layers)
        self.form.fill_digests(self.values, hex_of(self.digests.reshape(n * layers, -1)).reshape(n, layers * DIGEST))
        return self.values
