from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import SHAPES, make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """tiny_checkpoint(name) -> folder of that tiny model, made once per session."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_checkpoint(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(scope="session")
def shape_names() -> list[str]:
    return list(SHAPES)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo model, built once per session into a temporary folder."""
    from moe_core.demo import build_demo_model

    path = tmp_path_factory.mktemp("demo-model")
    build_demo_model(path)
    return path


def need_tool(name: str) -> str:
    """The path of a system tool a test needs. Missing: skip on a dev machine, fail under CI (which installs it)."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required under CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path
