"""The Redis value of the expert-output cache: one token's rows of every MoE layer."""

from __future__ import annotations

import numpy as np

from router_service.cache_bundles import BundleFormat, StepBundles

LAYERS = (1, 3, 4)  # MoE layers need not be every layer
ROW_BYTES = 16


def keys_of(layer: int, n: int) -> list[str]:
    return [f"moe:rev:{layer}:{layer:02d}{i:030x}" for i in range(n)]


def hex_of(keys: list[str]) -> np.ndarray:
    """[n, 32] ASCII: the hex digests of these keys, as a value holds them."""
    return np.frombuffer("".join(key[-32:] for key in keys).encode(), dtype=np.uint8).reshape(len(keys), 32)


def digests_of(keys: list[str]) -> np.ndarray:
    """[n, 16]: the binary digests of these keys, as the router hands them to a step's values."""
    return np.frombuffer(bytes.fromhex("".join(key[-32:] for key in keys)), dtype=np.uint8).reshape(len(keys), 16)


def rows_of(layer: int, n: int) -> np.ndarray:
    return (np.arange(n * ROW_BYTES, dtype=np.uint8).reshape(n, ROW_BYTES) + 7 * layer).astype(np.uint8)


def filled(n: int = 5) -> tuple[BundleFormat, StepBundles]:
    form = BundleFormat(LAYERS, ROW_BYTES)
    step = StepBundles(9, form, rows=np.arange(n), keys=keys_of(LAYERS[0], n))
    for position, layer in enumerate(LAYERS):
        assert not step.complete
        step.fill(position, digests_of(keys_of(layer, n)), rows_of(layer, n))
    step.finished()
    return form, step


def test_every_layers_key_and_row_come_back_from_a_value():
    form, step = filled()
    assert step.complete and step.values.shape == (5, form.size)
    assert form.size == 4 + 4 * len(LAYERS) + (32 + ROW_BYTES) * len(LAYERS)
    for position, layer in enumerate(LAYERS):
        assert [form.head] * 5 == [bytes(v[:len(form.head)]) for v in step.values]
        np.testing.assert_array_equal(form.digests(step.values, position), hex_of(keys_of(layer, 5)))
        np.testing.assert_array_equal(form.rows(step.values, position), rows_of(layer, 5))


def test_a_value_is_valid_only_for_its_own_key_layers_and_size():
    form, step = filled()
    values = [bytes(v) for v in step.values]
    assert all(form.valid(v, key) for v, key in zip(values, step.keys, strict=True))
    assert not form.valid(values[0], step.keys[1])  # another token's key
    assert not form.valid(values[0][:-1], step.keys[0])  # cut short
    assert not form.valid(b"X" + values[0][1:], step.keys[0])  # not our magic
    assert not BundleFormat((1, 3), ROW_BYTES).valid(values[0], step.keys[0])  # other layers
    assert not BundleFormat(LAYERS, ROW_BYTES * 2).valid(values[0], step.keys[0])  # other row width
    assert not form.valid(bytes(ROW_BYTES), step.keys[0])  # a bare row, as routers before these values wrote


def test_a_step_missing_a_layer_is_not_complete():
    form = BundleFormat(LAYERS, ROW_BYTES)
    step = StepBundles(0, form, rows=np.array([0, 2]), keys=keys_of(1, 2))
    step.fill(0, digests_of(keys_of(1, 2)), rows_of(1, 2))
    step.fill(2, digests_of(keys_of(4, 2)), rows_of(4, 2))
    assert not step.complete
