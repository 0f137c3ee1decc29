"""Model configurations, one dataclass per family, read from a Hugging Face `config.json`.

Each family's dataclass holds the fields its reference implementation reads, derives sizes in
`__post_init__`, and answers the questions the model math asks (is layer l sparse, which norm do
q/k get, what sliding window does layer l use). Values are validated here so that nothing deep in
the tensor code fails on a bad checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from moe_core.errors import ConfigError
from moe_core.names import CheckpointNames
from moe_core.rope import RopeConfig, parse_rope

QkNorm = Literal["none", "head", "full"]
log = logging.getLogger(__name__)


class _Fields:
    """Typed access to one config.json dict; every error names the file and the key."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data = data
        self.source = source

    def required(self, key: str, kind: type) -> Any:
        if key not in self.data or self.data[key] is None:
            raise ConfigError(f"{self.source}: missing required field '{key}'")
        return self._check(key, self.data[key], kind)

    def optional(self, key: str, kind: type, default: Any) -> Any:
        value = self.data.get(key)
        return default if value is None else self._check(key, value, kind)

    def first(self, keys: tuple[str, ...], kind: type) -> Any:
        for key in keys:
            if self.data.get(key) is not None:
                return self._check(key, self.data[key], kind)
        raise ConfigError(f"{self.source}: missing required field '{keys[0]}' (also looked for {keys[1:]})")

    def _check(self, key: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise ConfigError(
                f"{self.source}: field '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
            )
        return value


def _eos_ids(value: Any, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{source}: field 'eos_token_id' must be an int or a list of ints, got {value!r}")
    return tuple(ids)


@dataclass(frozen=True)
class MoeConfig:
    """Fields every supported family shares; family subclasses add their own."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    names: ClassVar[CheckpointNames]
    default_rope_theta: ClassVar[float] = 10000.0

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    source: str = field(default="config.json", compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.hidden_size > 0, "hidden_size must be positive"),
            (self.num_hidden_layers > 0, "num_hidden_layers must be positive"),
            (self.num_attention_heads > 0, "num_attention_heads must be positive"),
            (self.num_key_value_heads > 0, "num_key_value_heads must be positive"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim must be positive and even"),
            (self.num_experts > 0, "the number of experts must be positive"),
            (0 < self.num_experts_per_tok <= self.num_experts,
             "num_experts_per_tok must be between 1 and the number of experts"),
            (self.moe_intermediate_size > 0, "the expert intermediate size must be positive"),
            (self.rms_norm_eps > 0, "rms_norm_eps must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{self.source}: {message}")
        in_vocab = tuple(i for i in self.eos_token_ids if 0 <= i < self.vocab_size)
        if in_vocab != self.eos_token_ids:
            # transformers only warns here; an id the model can never produce cannot end a sequence.
            log.warning("%s: ignoring eos_token_id outside the vocabulary: %s", self.source,
                        sorted(set(self.eos_token_ids) - set(in_vocab)))
            object.__setattr__(self, "eos_token_ids", in_vocab)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_hidden_layers) if self.is_moe_layer(layer)]

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def sliding_window(self, layer: int) -> int | None:
        return None

    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def o_bias(self) -> bool:
        return False

    @property
    def qk_norm(self) -> QkNorm:
        return "none"

    @property
    def clip_qkv(self) -> float | None:
        return None

    @property
    def shared_expert_intermediate_size(self) -> int:
        return 0

    @classmethod
    def common_fields(cls, f: _Fields) -> dict[str, Any]:
        hidden = f.required("hidden_size", int)
        heads = f.required("num_attention_heads", int)
        head_dim_default = None if heads <= 0 or hidden % heads else hidden // heads
        head_dim = f.optional("head_dim", int, head_dim_default)
        if head_dim is None:
            raise ConfigError(f"{f.source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        act = f.optional("hidden_act", str, "silu")
        if act != "silu":
            raise ConfigError(f"{f.source}: hidden_act '{act}' is not supported (only 'silu')")
        return dict(
            vocab_size=f.required("vocab_size", int),
            hidden_size=hidden,
            num_hidden_layers=f.required("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=f.optional("num_key_value_heads", int, heads),
            head_dim=head_dim,
            rms_norm_eps=f.optional("rms_norm_eps", float, 1e-6),
            max_position_embeddings=f.optional("max_position_embeddings", int, 4096),
            tie_word_embeddings=f.optional("tie_word_embeddings", bool, False),
            rope=parse_rope(f.data, f.source, cls.default_rope_theta, f.optional("max_position_embeddings", int, 4096)),
            bos_token_id=f.optional("bos_token_id", int, None),
            eos_token_ids=_eos_ids(f.data.get("eos_token_id"), f.source),
            pad_token_id=f.optional("pad_token_id", int, None),
            torch_dtype=f.optional("torch_dtype", str, f.optional("dtype", str, "float32")),
            source=f.source,
        )


@dataclass(frozen=True)
class MixtralConfig(MoeConfig):
    model_type: ClassVar[str] = "mixtral"
    architecture: ClassVar[str] = "MixtralForCausalLM"
    names: ClassVar[CheckpointNames] = CheckpointNames(moe_block="block_sparse_moe", experts=("w1", "w3", "w2"))
    default_rope_theta: ClassVar[float] = 1e6

    window: int | None = None

    def sliding_window(self, layer: int) -> int | None:
        return self.window

    @classmethod
    def from_fields(cls, f: _Fields) -> MixtralConfig:
        ffn = f.required("intermediate_size", int)
        return cls(
            **cls.common_fields(f),
            num_experts=f.first(("num_local_experts", "num_experts"), int),
            num_experts_per_tok=f.required("num_experts_per_tok", int),
            moe_intermediate_size=ffn,
            intermediate_size=ffn,
            norm_topk_prob=True,
            window=f.optional("sliding_window", int, None),
        )


@dataclass(frozen=True)
class Qwen2MoeConfig(MoeConfig):
    model_type: ClassVar[str] = "qwen2_moe"
    architecture: ClassVar[str] = "Qwen2MoeForCausalLM"
    names: ClassVar[CheckpointNames] = CheckpointNames(
        moe_block="mlp", experts=("gate_proj", "up_proj", "down_proj")
    )

    shared_expert_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bias_on_qkv: bool = True
    layer_windows: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_sparse_step <= 0:
            raise ConfigError(f"{self.source}: decoder_sparse_step must be positive")

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def sliding_window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def qkv_bias(self) -> bool:
        return self.bias_on_qkv

    @property
    def shared_expert_intermediate_size(self) -> int:
        return self.shared_expert_size

    @classmethod
    def from_fields(cls, f: _Fields) -> Qwen2MoeConfig:
        common = cls.common_fields(f)
        return cls(
            **common,
            num_experts=f.first(("num_experts", "num_local_experts"), int),
            num_experts_per_tok=f.required("num_experts_per_tok", int),
            moe_intermediate_size=f.required("moe_intermediate_size", int),
            intermediate_size=f.required("intermediate_size", int),
            norm_topk_prob=f.optional("norm_topk_prob", bool, False),
            shared_expert_size=f.optional("shared_expert_intermediate_size", int, 0),
            decoder_sparse_step=f.optional("decoder_sparse_step", int, 1),
            mlp_only_layers=tuple(f.optional("mlp_only_layers", list, [])),
            bias_on_qkv=f.optional("qkv_bias", bool, True),
            layer_windows=_qwen2_windows(f, common["num_hidden_layers"]),
        )


def _qwen2_windows(f: _Fields, layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows as transformers' Qwen2-MoE derives them from `layer_types`."""
    if not f.optional("use_sliding_window", bool, False):
        return ()
    window = f.optional("sliding_window", int, 4096)
    max_window_layers = f.optional("max_window_layers", int, 28)
    layer_types = f.optional("layer_types", list, None) or [
        "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention" for i in range(layers)
    ]
    if len(layer_types) != layers:
        raise ConfigError(f"{f.source}: layer_types has {len(layer_types)} entries for {layers} layers")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


@dataclass(frozen=True)
class Qwen3MoeConfig(MoeConfig):
    model_type: ClassVar[str] = "qwen3_moe"
    architecture: ClassVar[str] = "Qwen3MoeForCausalLM"
    names: ClassVar[CheckpointNames] = CheckpointNames(
        moe_block="mlp", experts=("gate_proj", "up_proj", "down_proj")
    )

    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    attention_bias: bool = False
    window: int | None = None

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def sliding_window(self, layer: int) -> int | None:
        return self.window

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> QkNorm:
        return "head"

    @classmethod
    def from_fields(cls, f: _Fields) -> Qwen3MoeConfig:
        use_window = f.optional("use_sliding_window", bool, False)
        return cls(
            **cls.common_fields(f),
            num_experts=f.first(("num_experts", "num_local_experts"), int),
            num_experts_per_tok=f.required("num_experts_per_tok", int),
            moe_intermediate_size=f.required("moe_intermediate_size", int),
            intermediate_size=f.required("intermediate_size", int),
            norm_topk_prob=f.optional("norm_topk_prob", bool, False),
            decoder_sparse_step=f.optional("decoder_sparse_step", int, 1),
            mlp_only_layers=tuple(f.optional("mlp_only_layers", list, [])),
            attention_bias=f.optional("attention_bias", bool, False),
            window=f.optional("sliding_window", int, 4096) if use_window else None,
        )


@dataclass(frozen=True)
class OlmoeConfig(MoeConfig):
    model_type: ClassVar[str] = "olmoe"
    architecture: ClassVar[str] = "OlmoeForCausalLM"
    names: ClassVar[CheckpointNames] = CheckpointNames(
        moe_block="mlp", experts=("gate_proj", "up_proj", "down_proj")
    )

    clip: float | None = None
    attention_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(f"{self.source}: OLMoE needs head_dim * num_attention_heads == hidden_size")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> QkNorm:
        return "full"

    @property
    def clip_qkv(self) -> float | None:
        return self.clip

    @classmethod
    def from_fields(cls, f: _Fields) -> OlmoeConfig:
        ffn = f.required("intermediate_size", int)
        return cls(
            **cls.common_fields(f),
            num_experts=f.first(("num_experts", "num_local_experts"), int),
            num_experts_per_tok=f.required("num_experts_per_tok", int),
            moe_intermediate_size=ffn,
            intermediate_size=ffn,
            norm_topk_prob=f.optional("norm_topk_prob", bool, False),
            clip=f.optional("clip_qkv", float, None),
            attention_bias=f.optional("attention_bias", bool, False),
        )


FAMILIES: dict[str, type[MoeConfig]] = {
    c.model_type: c for c in (MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig)
}


def config_from_dict(data: dict[str, Any], source: str = "config.json") -> MoeConfig:
    """Build the family config that `data['model_type']` names."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: missing required field 'model_type'")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            f"{source}: model_type '{model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return family.from_fields(_Fields(data, source))  # type: ignore[attr-defined]


def load_config(model_dir: str | Path) -> MoeConfig:
    """Read `config.json` (and eos ids from `generation_config.json` where it has them)."""
    path = Path(model_dir) / "config.json"
    data = _read_json(path)
    config = config_from_dict(data, str(path))
    generation = Path(model_dir) / "generation_config.json"
    if generation.exists():
        gen_eos = _eos_ids(_read_json(generation).get("eos_token_id"), str(generation))
        merged = tuple(dict.fromkeys(config.eos_token_ids + gen_eos))
        if merged != config.eos_token_ids:
            config = replace(config, eos_token_ids=merged)
    return config


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
