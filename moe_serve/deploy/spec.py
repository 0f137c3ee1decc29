"""What a deployment is made of, the same for Kubernetes and docker-compose: the shards of a placement,
and each service's container (command, arguments, `MOE_*` settings, ports, health checks, drain time).

Expert replicas are reached by name: shard `shard-0` is served by `expert-shard-0`, a headless Service
(Kubernetes) or a compose service with `deploy.replicas`, whose name resolves to every replica; the
placement file given to the router and the expert services lists that name as the shard's address.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_core.config import load_config
from moe_core.errors import ConfigError
from moe_core.placement import pairs_from_spec, parse_ffn

IMAGE = "moe-serve:cpu"
MODEL_DIR = "/models/model"  # the model folder inside every container (mounted read-only)
CONFIG_DIR = "/etc/moe"
PLACEMENT_FILE = f"{CONFIG_DIR}/placement.json"
DEFAULT_MODEL_NAME = "demo-v1"
DEFAULT_PLACEMENT: dict[str, Any] = {"shards": [{"id": "shard-0", "experts": "0-3"},
                                                {"id": "shard-1", "experts": "4-7"}]}
PORTS = {"gateway": {"http": 8000}, "router": {"grpc": 50050, "metrics": 9400},
         "expert": {"grpc": 50051, "data": 50052, "metrics": 9401}}
GRPC_SERVICES = {"router": "moe.v1.RouterService", "expert": "moe.v1.ExpertService"}
# How long each service takes to stop after SIGTERM: the gateway drains in-flight requests
# (MOE_DRAIN_TIMEOUT_S); router and expert services stop their gRPC server with a 5 s grace.
DRAIN_S = {"gateway": 30, "router": 5, "expert": 5}
REDIS_URL = "redis://redis:6379/0"
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# A knob: (variable, default) -> the value written for it (compose: "${VAR:-default}", k8s: a literal).
Knob = Callable[[str, Any], str]


@dataclass
class Shard:
    shard_id: str
    experts: Any  # the placement's `experts` value, passed through unchanged
    ffn: str | None = None  # the placement's `ffn` slice ("0/2"), passed through when set

    @property
    def service(self) -> str:
        return service_name(self.shard_id)


@dataclass
class DeployConfig:
    shards: list[Shard]
    replicas: int = 1  # per shard (and the gateway's and router's starting count)
    max_replicas: int = 4  # autoscaling ceiling per shard
    image: str = IMAGE
    model_name: str = DEFAULT_MODEL_NAME


@dataclass
class Container:
    role: str  # gateway | router | expert
    name: str  # Deployment / Service / compose service name
    command: list[str]
    args: list[str]
    env: dict[str, str]
    ports: dict[str, int]
    drain_s: int
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_service(self) -> str | None:
        return GRPC_SERVICES.get(self.role)

    def health_command(self) -> list[str]:
        """The check a container can run on itself (no curl or grpcurl in the image)."""
        if self.role == "gateway":
            return ["python", "-m", "moe_serve.health", "--http", f"http://127.0.0.1:{self.ports['http']}/readyz"]
        return ["python", "-m", "moe_serve.health", "--grpc", f"127.0.0.1:{self.ports['grpc']}",
                "--service", self.grpc_service]


def service_name(shard_id: str) -> str:
    name = "expert-" + re.sub(r"[^a-z0-9-]+", "-", shard_id.lower()).strip("-")
    if not _NAME.fullmatch(name) or len(name) > 63:
        raise ConfigError(f"shard id '{shard_id}' does not make a valid service name ('{name}')")
    return name


def even_placement(num_experts: int, shards: int) -> dict[str, Any]:
    """Contiguous expert ranges on every MoE layer (the same bounds as moe_core.placement.even_split)."""
    if not 1 <= shards <= num_experts:
        raise ConfigError(f"cannot split {num_experts} experts into {shards} shards")
    bounds = [round(i * num_experts / shards) for i in range(shards + 1)]
    return {"shards": [{"id": f"shard-{i}", "experts": f"{bounds[i]}-{bounds[i + 1] - 1}"} for i in range(shards)]}


def load_shards(placement: str | Path | None = None, model: str | Path | None = None,
                shards: int | None = None) -> list[Shard]:
    """Shards from a placement file, an even split into `shards`, or the default 2-shard placement.

    With `model` (a folder with config.json) the placement is checked against that model."""
    if placement:
        try:
            data = json.loads(Path(placement).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{placement}: cannot read the placement ({exc})") from exc
    elif shards:
        experts = load_config(model).num_experts if model else 8
        data = even_placement(experts, shards)
    else:
        data = DEFAULT_PLACEMENT
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list) or not data["shards"]:
        raise ConfigError(f"{placement}: expected {{\"shards\": [...]}} with at least one shard")
    result = [Shard(s.get("id") or f"shard-{i}", s.get("experts"), s.get("ffn")) for i, s in enumerate(data["shards"])]
    for s in result:
        if s.experts in (None, "", [], {}):
            raise ConfigError(f"{placement}: shard '{s.shard_id}' has no 'experts'")
        if s.ffn is not None:
            parse_ffn(s.ffn, f"{placement}: shard '{s.shard_id}'")
    if model:
        cfg = load_config(model)
        for s in result:
            pairs_from_spec(cfg, s.experts, where=f"{placement or 'placement'}: shard '{s.shard_id}'")
    names = [s.service for s in result]
    if len(set(names)) != len(names):
        raise ConfigError(f"shard ids {[s.shard_id for s in result]} give clashing service names {names}")
    return result


def placement_text(shards: list[Shard]) -> str:
    """The placement file the containers read: each shard's address is its service name."""
    doc = {"shards": [{"id": s.shard_id, "experts": s.experts, **({"ffn": s.ffn} if s.ffn else {}),
                       "replicas": [f"{s.service}:{PORTS['expert']['grpc']}"]} for s in shards]}
    return json.dumps(doc, indent=2) + "\n"


def _labels(role: str, shard: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "moe-serve", "app.kubernetes.io/component": role,
              "app.kubernetes.io/part-of": "moe-serve"}
    if shard:
        labels["moe-serve/shard"] = shard
    return labels


def gateway(knob: Knob) -> Container:
    env = {"MOE_MODEL": MODEL_DIR, "MOE_MODEL_NAME": knob("MOE_MODEL_NAME", DEFAULT_MODEL_NAME),
           "MOE_HOST": "0.0.0.0", "MOE_PORT": str(PORTS["gateway"]["http"]),
           "MOE_ROUTER": f"router:{PORTS['router']['grpc']}", "MOE_DRAIN_TIMEOUT_S": str(DRAIN_S["gateway"])}
    return Container("gateway", "gateway", ["python", "-m", "gateway"], [], env, dict(PORTS["gateway"]),
                     DRAIN_S["gateway"], _labels("gateway"))


def router(knob: Knob) -> Container:
    env = {"MOE_MODEL": MODEL_DIR, "MOE_MODEL_ID": knob("MOE_MODEL_NAME", DEFAULT_MODEL_NAME),
           "MOE_HOST": "0.0.0.0", "MOE_PORT": str(PORTS["router"]["grpc"]),
           "MOE_METRICS_PORT": str(PORTS["router"]["metrics"]), "MOE_DTYPE": knob("MOE_DTYPE", "auto"),
           "MOE_DEVICE": "cpu", "MOE_THREADS": knob("MOE_ROUTER_THREADS", 0),
           "MOE_KV_CACHE_MIB": knob("MOE_KV_CACHE_MIB", 1024), "MOE_REDIS_URL": REDIS_URL}
    return Container("router", "router", ["python", "-m", "router_service"], ["--placement", PLACEMENT_FILE], env,
                     dict(PORTS["router"]), DRAIN_S["router"], _labels("router"))


def expert(shard: Shard, knob: Knob, device: str = "cpu") -> Container:
    env = {"MOE_MODEL": MODEL_DIR, "MOE_MODEL_ID": knob("MOE_MODEL_NAME", DEFAULT_MODEL_NAME),
           "MOE_HOST": "0.0.0.0", "MOE_PORT": str(PORTS["expert"]["grpc"]),
           "MOE_DATA_PORT": str(PORTS["expert"]["data"]), "MOE_METRICS_PORT": str(PORTS["expert"]["metrics"]),
           "MOE_DTYPE": knob("MOE_DTYPE", "auto"),
           "MOE_DEVICE": device, "MOE_THREADS": knob("MOE_EXPERT_THREADS", 0)}
    return Container("expert", shard.service, ["python", "-m", "expert_service"],
                     ["--placement", PLACEMENT_FILE, "--shard-id", shard.shard_id], env, dict(PORTS["expert"]),
                     DRAIN_S["expert"], _labels("expert", shard.shard_id))
