"""The Prometheus configs and alert rules in deploy/prometheus: promtool accepts them, the rules' unit
tests pass, and the compose and Kubernetes service discovery relabels targets into the labels the
dashboards and alerts use (proven by a real Prometheus fed the same discovery labels through file_sd)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from moe_serve.prometheus import RULES, launch_prometheus, stop_prometheus, write_local_config
from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
CLUSTER = {"url": "http://127.0.0.1:8000", "services": [
    {"name": "expert 0.0", "role": "expert", "shard": "shard-0", "replica": 0,
     "metrics_url": "http://127.0.0.1:9501/metrics"},
    {"name": "expert 0.1", "role": "expert", "shard": "shard-0", "replica": 1,
     "metrics_url": "http://127.0.0.1:9502/metrics"},
    {"name": "expert 1.0", "role": "expert", "shard": "shard-1", "replica": 0,
     "metrics_url": "http://127.0.0.1:9503/metrics"},
    {"name": "router 0", "role": "router", "index": 0, "metrics_url": "http://127.0.0.1:9400/metrics"},
    {"name": "gateway", "role": "gateway", "metrics_url": "http://127.0.0.1:8000/metrics"}]}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def with_file_sd(config: dict, sd_key: str, targets_file: Path) -> dict:
    """The config with each job's `sd_key` discovery replaced by a file_sd reading `targets_file`."""
    for job in config["scrape_configs"]:
        if job.pop(sd_key, None) is not None:
            job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
    config["rule_files"] = [str(RULES)]
    return config


def relabelled_targets(tmp_path: Path, config: dict, groups: list[dict], expected: int) -> dict[str, list[dict]]:
    """Run Prometheus on `config` with discovered `groups`; its active targets' labels and the dropped count."""
    (tmp_path / "targets.json").write_text(json.dumps(groups))
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    check = promtool("check", "config", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    process, url = launch_prometheus(path, tmp_path / "prom")
    try:
        deadline = time.monotonic() + 30
        while True:
            data = httpx.get(f"{url}/api/v1/targets").json()["data"]
            if len(data["activeTargets"]) >= expected or time.monotonic() > deadline:
                return {"active": [t["labels"] for t in data["activeTargets"]], "dropped": data["droppedTargets"]}
            time.sleep(0.2)
    finally:
        stop_prometheus(process)


def test_alert_rules_pass_promtool_and_their_unit_tests():
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 10 rules found" in check.stdout
    unit = promtool("test", "rules", "alerts_test.yml", cwd=PROM)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_has_for_severity_summary_and_description():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {"MoeShardDown", "MoeExpertImbalance", "MoeRequestErrors", "MoeGateway5xx", "MoeExpertCacheErrors",
            "MoeHighTimeToFirstToken"} <= {r["alert"] for r in rules}
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_prometheus_rule_for_the_operator_carries_the_same_groups():
    rule = yaml.safe_load((PROM / "k8s" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_generated_local_config_passes_promtool(tmp_path):
    path = write_local_config(CLUSTER, tmp_path / "prometheus.yml")
    check = promtool("check", "config", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 10 rules found" in check.stdout
    jobs = {j["job_name"]: j["static_configs"] for j in json.loads(path.read_text())["scrape_configs"]}
    assert set(jobs) == {"gateway", "router", "expert"}
    assert [g["labels"]["shard"] for g in jobs["expert"]] == ["shard-0", "shard-0", "shard-1"]
    assert [g["labels"]["replica"] for g in jobs["expert"]] == ["0", "1", "0"]
    assert "shard" not in jobs["router"][0]["labels"]  # the router's own series carry shard/replica


def test_compose_config_passes_promtool_and_labels_replicas_by_shard(tmp_path):
    compose = PROM / "prometheus.yml"
    check = promtool("check", "config", str(compose))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 10 rules found" in check.stdout
    config = yaml.safe_load(compose.read_text())
    ports = {j["job_name"]: j["dns_sd_configs"][0]["port"] for j in config["scrape_configs"] if "dns_sd_configs" in j}
    assert ports == {"gateway": 8000, "router": 9400, "expert": 9401}
    # What DNS discovery yields for two replicas of expert-shard-0 and one of each other service.
    dns = [("gateway", "192.0.2.1", 8000), ("router", "192.0.2.2", 9400), ("expert-shard-0", "192.0.2.3", 9401),
           ("expert-shard-0", "192.0.2.4", 9401), ("expert-shard-1", "192.0.2.5", 9401)]
    groups = [{"targets": [f"{ip}:{port}"], "labels": {"__meta_dns_name": name}} for name, ip, port in dns]
    # file_sd feeds every group to every job; keep each job to its own names, as DNS discovery does.
    config = with_file_sd(config, "dns_sd_configs", tmp_path / "targets.json")
    for job in config["scrape_configs"]:
        names = {"gateway": "gateway", "router": "router", "expert": "expert-.+"}.get(job["job_name"])
        if names:
            job["relabel_configs"] = [{"source_labels": ["__meta_dns_name"], "regex": names, "action": "keep"},
                                      *job.get("relabel_configs", [])]
    targets = relabelled_targets(tmp_path, config, groups, expected=6)
    experts = sorted((t["shard"], t["replica"]) for t in targets["active"] if t["job"] == "expert")
    assert experts == [("shard-0", "192.0.2.3:9401"), ("shard-0", "192.0.2.4:9401"), ("shard-1", "192.0.2.5:9401")]
    router = next(t for t in targets["active"] if t["job"] == "router")
    assert "shard" not in router and "replica" not in router


def _pod(name: str, component: str, ip: str, port: int, shard: str | None = None, scrape: str = "true",
         app: str = "moe-serve", phase: str = "Running") -> dict:
    labels = {"__address__": f"{ip}:{port}", "__meta_kubernetes_namespace": "moe-serve",
              "__meta_kubernetes_pod_name": name, "__meta_kubernetes_pod_ip": ip,
              "__meta_kubernetes_pod_phase": phase, "__meta_kubernetes_pod_node_name": "node-1",
              "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
              "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
              "__meta_kubernetes_pod_annotation_prometheus_io_scrape": scrape,
              "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
              "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics"}
    if shard:
        labels["__meta_kubernetes_pod_label_moe_serve_shard"] = shard
    return {"targets": [f"{ip}:{port}"], "labels": labels}


def test_kubernetes_config_relabels_pods_into_job_component_shard_replica(tmp_path):
    path = PROM / "k8s" / "prometheus.yml"
    check = promtool("check", "config", str(path))
    if check.returncode != 0:
        # Debian's prometheus is built without Kubernetes discovery; everything else is checked below.
        assert "field kubernetes_sd_configs not found" in check.stdout + check.stderr, check.stdout + check.stderr
    config = with_file_sd(yaml.safe_load(path.read_text()), "kubernetes_sd_configs", tmp_path / "targets.json")
    pods = [_pod("gateway-7c9f", "gateway", "10.1.0.1", 8000), _pod("router-5d4b", "router", "10.1.0.2", 9400),
            _pod("expert-shard-0-a1", "expert", "10.1.0.3", 9401, "shard-0"),
            _pod("expert-shard-0-b2", "expert", "10.1.0.4", 9401, "shard-0"),
            _pod("expert-shard-1-c3", "expert", "10.1.0.5", 9401, "shard-1"),
            _pod("redis-0", "cache", "10.1.0.6", 6379, scrape="false"),
            _pod("other-app", "expert", "10.1.0.7", 9401, app="something-else"),
            _pod("expert-shard-1-new", "expert", "10.1.0.8", 9401, "shard-1", phase="Pending")]
    targets = relabelled_targets(tmp_path, config, pods, expected=5)
    got = sorted((t["job"], t["component"], t.get("shard", ""), t.get("replica", ""), t["instance"], t["pod"])
                 for t in targets["active"])
    assert got == [("expert", "expert", "shard-0", "expert-shard-0-a1", "10.1.0.3:9401", "expert-shard-0-a1"),
                   ("expert", "expert", "shard-0", "expert-shard-0-b2", "10.1.0.4:9401", "expert-shard-0-b2"),
                   ("expert", "expert", "shard-1", "expert-shard-1-c3", "10.1.0.5:9401", "expert-shard-1-c3"),
                   ("gateway", "gateway", "", "", "10.1.0.1:8000", "gateway-7c9f"),
                   ("router", "router", "", "", "10.1.0.2:9400", "router-5d4b")]
    assert len(targets["dropped"]) == 3
    assert all(t["namespace"] == "moe-serve" for t in targets["active"])


def test_pod_monitor_scrapes_the_ports_the_manifests_name():
    monitor = yaml.safe_load((PROM / "k8s" / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["jobLabel"] == "app.kubernetes.io/component"
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    base = ROOT / "deploy" / "k8s" / "base"
    if not base.is_dir():
        pytest.skip("no Kubernetes manifests in deploy/k8s/base")
    seen = set()
    for doc in (d for f in sorted(base.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d):
        if doc.get("kind") != "Deployment":
            continue
        template = doc["spec"]["template"]["metadata"]
        port = template.get("annotations", {}).get("prometheus.io/port")
        if port is None:
            continue
        named = {p["containerPort"]: p["name"] for c in doc["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert named.get(int(port)) in ports, f"{doc['metadata']['name']}: metrics port {port} is not named " \
                                              f"one of {ports} (the PodMonitor would not scrape it)"
        seen.add(template["labels"]["app.kubernetes.io/component"])
    assert seen == {"gateway", "router", "expert"}
