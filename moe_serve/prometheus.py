"""Prometheus for a local `moe-serve up` cluster: a scrape config written from `cluster.json`, and the
`prometheus` binary started on it (with the alert rules of deploy/prometheus/alerts.yml).

Targets get the job names the docker-compose and Kubernetes configs in deploy/prometheus use
(`gateway`, `router`, `expert`), and expert targets a `shard` and a `replica` label, so the Grafana
dashboards and the alert rules work unchanged on all three. Router targets carry no `shard`/`replica`
label: the router's own series have those labels (one per replica it calls), and a target label of
the same name would rename them to `exported_shard`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from moe_serve.launcher import LaunchError
from moe_serve.ports import free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"  # in a source checkout
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
JOBS = ("gateway", "router", "expert")


class PrometheusError(LaunchError):
    """The prometheus binary is missing, or did not become ready."""


def scrape_targets(cluster: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Static target groups per job: one group per service, `host:port` from its `metrics_url`."""
    jobs: dict[str, list[dict[str, Any]]] = {job: [] for job in JOBS}
    for service in cluster["services"]:
        url = service.get("metrics_url")
        if not url or service["role"] not in jobs:
            continue
        labels = {"service": service["name"].replace(" ", "-")}
        if service["role"] == "expert":
            labels |= {"shard": str(service["shard"]), "replica": str(service["replica"])}
        jobs[service["role"]].append({"targets": [urlsplit(url).netloc], "labels": labels})
    return jobs


def local_config(cluster: dict[str, Any], scrape_interval: str = "2s",
                 rules: list[Path] | None = None) -> dict[str, Any]:
    """The whole Prometheus config (as a dict) for a local cluster."""
    rules = [RULES] if rules is None and RULES.is_file() else rules or []
    scrape = [{"job_name": job, "metrics_path": "/metrics", "static_configs": groups}
              for job, groups in scrape_targets(cluster).items() if groups]
    return {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                       "external_labels": {"cluster": "moe-serve-local"}},
            "rule_files": [str(Path(r).resolve()) for r in rules],
            "scrape_configs": scrape}


def write_local_config(cluster: dict[str, Any], path: str | Path, scrape_interval: str = "2s",
                       rules: list[Path] | None = None) -> Path:
    """Write the scrape config for the cluster described by `cluster` (cluster.json, parsed) to `path`.

    JSON is YAML, so the file needs no YAML library and Prometheus reads it as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(local_config(cluster, scrape_interval, rules), indent=2) + "\n")
    return path


def start_prometheus(run_dir: str | Path, cluster: dict[str, Any], port: int = 0, *, host: str = "127.0.0.1",
                     scrape_interval: str = "2s", timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start `prometheus` scraping the cluster; returns (process, base URL) once `/-/ready` answers.

    Config, TSDB (a new folder per start) and log go under `run_dir/prometheus/`, and a Grafana
    provisioning folder for this Prometheus under `run_dir/grafana/` (see docs/observability.md). The
    process dies with its parent (and at interpreter exit); `stop_prometheus` stops it earlier."""
    folder = Path(run_dir) / "prometheus"
    config = write_local_config(cluster, folder / "prometheus.yml", scrape_interval)
    process, url = launch_prometheus(config, folder, port, host=host, timeout_s=timeout_s)
    write_grafana_provisioning(Path(run_dir) / "grafana", url)
    return process, url


def launch_prometheus(config: Path, folder: Path, port: int = 0, *, host: str = "127.0.0.1",
                      timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Run the prometheus binary on a config file, TSDB and log in `folder`, until `/-/ready` answers."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError("the prometheus binary is not installed (Debian/Ubuntu: apt-get install prometheus; "
                              "or download it from https://prometheus.io/download/)")
    folder.mkdir(parents=True, exist_ok=True)
    tsdb = tempfile.mkdtemp(prefix="tsdb-", dir=folder)
    port = port or free_port(host)
    log_path = folder / "prometheus.log"
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={tsdb}", f"--web.listen-address={host}:{port}"]
    with log_path.open("w") as log:
        # No preexec_fn: Python between fork and exec can abort when the parent holds gRPC threads.
        # The process is stopped at exit (atexit below) and by whoever started it.
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    atexit.register(stop_prometheus, process)
    url = f"http://{host}:{port}"
    try:
        _wait_ready(process, url, timeout_s, log_path)
    except PrometheusError:
        stop_prometheus(process)
        raise
    return process, url


def write_grafana_provisioning(folder: str | Path, prometheus_url: str, dashboards: str | Path = DASHBOARDS) -> Path:
    """Grafana provisioning for a Prometheus at `prometheus_url`: the data source (uid moe-prometheus, as
    the dashboards expect) and a file provider for the dashboards folder. Use it as Grafana's
    provisioning folder (GF_PATHS_PROVISIONING)."""
    folder = Path(folder)
    for sub in ("datasources", "dashboards", "plugins", "alerting", "notifiers"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    source = {"name": "Prometheus (moe-serve up)", "uid": "moe-prometheus", "type": "prometheus",
              "access": "proxy", "url": prometheus_url, "isDefault": True, "jsonData": {"timeInterval": "2s"}}
    provider = {"name": "moe-serve", "folder": "moe-serve", "type": "file", "updateIntervalSeconds": 30,
                "options": {"path": str(Path(dashboards).resolve())}}
    (folder / "datasources" / "moe-serve.yml").write_text(
        json.dumps({"apiVersion": 1, "datasources": [source]}, indent=2) + "\n")
    (folder / "dashboards" / "moe-serve.yml").write_text(
        json.dumps({"apiVersion": 1, "providers": [provider]}, indent=2) + "\n")
    return folder


def _wait_ready(process: subprocess.Popen, url: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = "\n    ".join(log.read_text().splitlines()[-10:])
            raise PrometheusError(f"prometheus exited with status {process.returncode}:\n    {tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise PrometheusError(f"prometheus at {url} not ready after {timeout_s:.0f}s (log: {log})")
        time.sleep(0.2)


def stop_prometheus(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
