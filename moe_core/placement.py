"""Which (layer, expert) pairs each shard holds.

A placement file (JSON) names shards, the pairs each one holds and, optionally, the addresses of its
replicas; the router, the expert services, docker-compose and Kubernetes all read the same file:

    {"shards": [{"id": "shard-0", "experts": "0-3", "replicas": ["10.0.0.5:50051"]},
                {"id": "shard-1", "experts": {"0": "4-7", "1": [4, 5, 6, 7]}}]}

`experts` is either one spec for every MoE layer ("0-3", "0,2,5-7", "all") or a map layer -> spec.

A shard may also hold a slice of its experts: `"ffn": "0/2"` is the first of two equal ranges of each
expert's intermediate dimension (tensor-parallel experts, `ffn_split`). Its output is a partial sum;
the router sends every row to one holder of each part and adds the parts up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_core.config import MoeConfig
from moe_core.errors import ConfigError

Pair = tuple[int, int]


@dataclass
class ShardSpec:
    shard_id: str
    pairs: list[Pair]
    replicas: list[str] = field(default_factory=list)
    ffn: tuple[int, int] = (0, 1)  # (part, parts) of every held expert's intermediate dimension


def parse_ffn(value: Any, where: str, size: int | None = None) -> tuple[int, int]:
    """"1/2" -> (1, 2): the part of each expert's FFN a shard computes (of an FFN of `size` rows, when given)."""
    part, sep, parts = str(value).partition("/")
    try:
        ffn = (int(part), int(parts))
    except ValueError:
        raise ConfigError(f"{where}: cannot read ffn slice '{value}' (use PART/PARTS, e.g. '0/2')") from None
    if not sep or not 0 <= ffn[0] < ffn[1]:
        raise ConfigError(f"{where}: ffn slice '{value}' must be PART/PARTS with 0 <= PART < PARTS")
    if size is not None and ffn[1] > size:
        raise ConfigError(f"{where}: cannot cut an FFN of {size} into {ffn[1]} parts")
    return ffn


def ffn_range(size: int, ffn: tuple[int, int]) -> slice:
    """The rows of an intermediate dimension of `size` that part ffn[0] of ffn[1] holds (near-equal ranges)."""
    part, parts = ffn
    return slice(size * part // parts, size * (part + 1) // parts)


def parse_ids(spec: str | list[int], limit: int, where: str) -> list[int]:
    """'0-3,6' / 'all' / [0, 1] -> sorted unique ids, each in [0, limit)."""
    if isinstance(spec, list):
        ids = spec
    elif spec.strip() == "all":
        ids = list(range(limit))
    else:
        ids = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                low, _, high = part.partition("-")
                ids += range(int(low), int(high or low) + 1)
            except ValueError:
                raise ConfigError(f"{where}: cannot read expert ids '{part}' (use e.g. '0-3,6' or 'all')") from None
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < limit]
    if bad:
        raise ConfigError(f"{where}: expert ids {bad} outside [0, {limit})")
    if not ids:
        raise ConfigError(f"{where}: no experts selected")
    return sorted(set(ids))


def pairs_from_spec(cfg: MoeConfig, experts: Any, layers: list[int] | None = None, where: str = "experts"
                    ) -> list[Pair]:
    """Pairs for an `experts` value: one spec for all (or the given) MoE layers, or {layer: spec}."""
    if isinstance(experts, dict):
        pairs = []
        for layer_key, spec in experts.items():
            layer = int(layer_key)
            if layer not in cfg.moe_layers:
                raise ConfigError(f"{where}: layer {layer} is not an MoE layer (MoE layers: {cfg.moe_layers})")
            pairs += [(layer, e) for e in parse_ids(spec, cfg.num_experts, f"{where}[{layer}]")]
        return sorted(pairs)
    chosen = cfg.moe_layers if layers is None else layers
    for layer in chosen:
        if layer not in cfg.moe_layers:
            raise ConfigError(f"{where}: layer {layer} is not an MoE layer (MoE layers: {cfg.moe_layers})")
    ids = parse_ids(experts, cfg.num_experts, where)
    return [(layer, e) for layer in chosen for e in ids]


def even_split(cfg: MoeConfig, shards: int) -> list[ShardSpec]:
    """Contiguous expert ranges of (nearly) equal size, the same on every MoE layer."""
    if not 1 <= shards <= cfg.num_experts:
        raise ConfigError(f"cannot split {cfg.num_experts} experts into {shards} shards")
    bounds = [round(i * cfg.num_experts / shards) for i in range(shards + 1)]
    return [ShardSpec(f"shard-{i}", [(layer, e) for layer in cfg.moe_layers for e in range(bounds[i], bounds[i + 1])])
            for i in range(shards)]


def ffn_split(cfg: MoeConfig, shards: int) -> list[ShardSpec]:
    """Every expert on every shard, each shard computing one slice of every expert's FFN.

    Every layer step then costs each shard the same, whichever experts the gates choose; with whole
    experts per shard, the shard holding a step's popular experts sets the pace while the other waits
    (bench/RESULTS.md, "Experts cut across shards"). Each row goes to every shard.
    """
    if not 1 <= shards <= cfg.moe_intermediate_size:
        raise ConfigError(f"cannot split an FFN of {cfg.moe_intermediate_size} into {shards} shards")
    pairs = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    return [ShardSpec(f"shard-{i}", list(pairs), ffn=(i, shards)) for i in range(shards)]


def split_by_layers(cfg: MoeConfig, shards: int) -> list[ShardSpec]:
    """Contiguous ranges of MoE layers, all experts of a layer on one shard.

    Only one shard works per layer step, with all its cores; on a single machine that beats every
    shard taking a slice of every layer at once (the slices compete for the same cores and memory).
    """
    layers = cfg.moe_layers
    if not 1 <= shards <= len(layers):
        raise ConfigError(f"cannot split {len(layers)} MoE layers into {shards} shards")
    bounds = [round(i * len(layers) / shards) for i in range(shards + 1)]
    return [ShardSpec(f"shard-{i}", [(layer, e) for layer in layers[bounds[i]:bounds[i + 1]]
                                     for e in range(cfg.num_experts)]) for i in range(shards)]


def load_placement(path: str | Path, cfg: MoeConfig) -> list[ShardSpec]:
    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: placement file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list) or not data["shards"]:
        raise ConfigError(f"{where}: expected {{\"shards\": [...]}} with at least one shard")
    specs = []
    for i, shard in enumerate(data["shards"]):
        shard_id = shard.get("id") or f"shard-{i}"
        if "experts" not in shard:
            raise ConfigError(f"{where}: shard '{shard_id}' has no 'experts'")
        pairs = pairs_from_spec(cfg, shard["experts"], where=f"{where}: shard '{shard_id}'")
        ffn = parse_ffn(shard.get("ffn", "0/1"), f"{where}: shard '{shard_id}'", cfg.moe_intermediate_size)
        specs.append(ShardSpec(shard_id, pairs, list(shard.get("replicas", [])), ffn))
    ids = [s.shard_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: shard ids must be unique, got {ids}")
    if len({s.ffn[1] for s in specs}) > 1:
        raise ConfigError(f"{where}: every shard must cut its experts into the same number of ffn parts, got "
                          f"{sorted({s.ffn[1] for s in specs})}")
    return specs


def write_placement(path: str | Path, specs: list[ShardSpec]) -> None:
    shards = []
    for spec in specs:
        by_layer: dict[str, list[int]] = {}
        for layer, expert in spec.pairs:
            by_layer.setdefault(str(layer), []).append(expert)
        shard = {"id": spec.shard_id, "experts": by_layer, "replicas": spec.replicas}
        if spec.ffn[1] > 1:
            shard["ffn"] = f"{spec.ffn[0]}/{spec.ffn[1]}"
        shards.append(shard)
    Path(path).write_text(json.dumps({"shards": shards}, indent=2) + "\n")


def uncovered(cfg: MoeConfig, specs: list[ShardSpec]) -> list[Pair]:
    """Pairs that some part of the FFN split lacks (with whole experts: pairs no shard holds)."""
    parts = max(spec.ffn[1] for spec in specs)
    missing = set()
    for part in range(parts):
        held = {pair for spec in specs if spec.ffn == (part, parts) for pair in spec.pairs}
        missing |= {(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts) if (layer, e) not in held}
    return sorted(missing)
