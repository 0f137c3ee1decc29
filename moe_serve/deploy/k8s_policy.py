"""The Kubernetes objects around the workloads: disruption budgets, autoscalers, network policies, Redis,
the model volume and Grafana dashboards as ConfigMaps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moe_serve.deploy.spec import Container, DeployConfig

REDIS_IMAGE = "redis:7.4-alpine"
REDIS_MAXMEMORY = "512mb"
PART_OF = {"app.kubernetes.io/part-of": "moe-serve"}
# Autoscaling targets (per replica), read through prometheus-adapter (deploy/k8s/autoscaling/).
TARGETS = {"gateway": ("moe_http_requests_in_flight", "32"), "router": ("moe_requests_waiting", "4"),
           "expert": ("moe_shard_tokens_per_second", "2000")}


def pdb(c: Container, match: dict[str, str]) -> dict[str, Any]:
    """At most one pod of a workload voluntarily down at a time (node drains, upgrades)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": c.name, "labels": c.labels},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": match}}}


def _metric(c: Container) -> dict[str, Any]:
    name, per_replica = TARGETS[c.role]
    target = {"type": "AverageValue", "averageValue": per_replica}
    if c.role == "expert":  # counted by the router per shard; divided by this shard's replicas
        return {"type": "External", "external": {
            "metric": {"name": name, "selector": {"matchLabels": {"shard": c.labels["moe-serve/shard"]}}},
            "target": target}}
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": target}}


def hpa(c: Container, cfg: DeployConfig) -> dict[str, Any]:
    metrics = [_metric(c)]
    if c.role == "gateway":
        metrics.append({"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": 70}}})
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": c.name, "labels": c.labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": c.name},
            "minReplicas": cfg.replicas, "maxReplicas": max(cfg.replicas, cfg.max_replicas), "metrics": metrics,
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 60,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
                "scaleDown": {"stabilizationWindowSeconds": 300,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
            },
        },
    }


def _component(role: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/component": role, **PART_OF}}


def _policy(name: str, role: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "labels": PART_OF},
            "spec": {"podSelector": _component(role), "policyTypes": ["Ingress"], "ingress": ingress}}


def _tcp(port: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port}]


def network_policies(gw: Container, rt: Container, ex: Container) -> list[dict[str, Any]]:
    """Deny by default; clients reach the gateway, only the gateway reaches the router, only the router
    reaches expert services and Redis; metrics ports are open to scrapers in any namespace."""
    scrapers = [{"namespaceSelector": {}}]
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "moe-default-deny-ingress", "labels": PART_OF},
            "spec": {"podSelector": {"matchLabels": PART_OF}, "policyTypes": ["Ingress"]}}
    return [
        deny,
        _policy("moe-gateway-ingress", "gateway", [{"ports": _tcp(gw.ports["http"])}]),
        _policy("moe-router-ingress", "router", [
            {"from": [{"podSelector": _component("gateway")}], "ports": _tcp(rt.ports["grpc"])},
            {"from": scrapers, "ports": _tcp(rt.ports["metrics"])}]),
        _policy("moe-expert-ingress", "expert", [
            {"from": [{"podSelector": _component("router")}],
             "ports": _tcp(ex.ports["grpc"]) + _tcp(ex.ports["data"])},
            {"from": scrapers, "ports": _tcp(ex.ports["metrics"])}]),
        _policy("moe-redis-ingress", "redis", [
            {"from": [{"podSelector": _component("router")}], "ports": _tcp(6379)}]),
    ]


def redis() -> list[dict[str, Any]]:
    """One Redis for the expert-output cache: memory-bounded, least-recently-used eviction, no persistence."""
    labels = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/component": "redis", **PART_OF}
    match = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/component": "redis"}
    ping = {"exec": {"command": ["redis-cli", "ping"]}}
    container = {
        "name": "redis", "image": REDIS_IMAGE, "imagePullPolicy": "IfNotPresent",
        "args": ["--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "allkeys-lru", "--save", "",
                 "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}],
        "readinessProbe": {**ping, "periodSeconds": 5, "timeoutSeconds": 2},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "timeoutSeconds": 3},
        "resources": {"requests": {"cpu": "100m", "memory": "640Mi"}, "limits": {"cpu": "1", "memory": "640Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "redis", "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": match}, "strategy": {"type": "Recreate"},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "enableServiceLinks": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "runAsGroup": 999,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container], "volumes": [{"name": "data", "emptyDir": {}}]}}},
    }
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "redis", "labels": labels},
           "spec": {"selector": match, "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]}}
    return [deployment, svc]


def model_claim() -> dict[str, Any]:
    """The model folder, shared by every pod (each mounts it read-only). ReadWriteMany so a loader pod can
    copy the checkpoint in once (deploy/README.md); single-node clusters can use the model-hostpath component."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "moe-model", "labels": PART_OF},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100Gi"}}}}


def dashboards(folder: Path) -> list[dict[str, Any]]:
    """One ConfigMap per dashboard JSON, labelled for Grafana's dashboard sidecar."""
    maps = []
    for path in sorted(folder.glob("*.json")):
        name = "grafana-dashboard-" + re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")
        maps.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": name[:63].rstrip("-"), "labels": {"grafana_dashboard": "1", **PART_OF}},
                     "data": {path.name: path.read_text()}})
    return maps

