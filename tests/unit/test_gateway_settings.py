"""GatewaySettings from flags and MOE_* variables, defaults, and clear errors on bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.settings import GatewaySettings
from moe_core.settings import SettingsError, flag_name, parse_settings, settings_from


def parse(argv: list[str], env: dict[str, str] | None = None) -> GatewaySettings:
    return parse_settings(GatewaySettings, argv, env=env or {})


def test_flags_and_defaults(tmp_path: Path):
    model = tmp_path / "my-model"
    model.mkdir()
    settings = parse(["--model", str(model), "--router", "localhost:50051", "--router", "10.0.0.2:50052"])
    assert settings.router == ["localhost:50051", "10.0.0.2:50052"]
    assert settings.model_name == "my-model"  # the folder's name by default
    assert (settings.host, settings.port, settings.ready_file) == ("127.0.0.1", 8000, None)
    assert (settings.request_timeout_s, settings.max_body_bytes) == (600.0, 2 * 1024 * 1024)
    assert (settings.max_n, settings.max_stop_sequences, settings.log_level) == (16, 8, "info")


def test_environment_variables_and_flag_precedence(tmp_path: Path):
    env = {"MOE_MODEL": str(tmp_path), "MOE_ROUTER": "a:1,[::1]:2", "MOE_PORT": "0", "MOE_MODEL_NAME": "mixtral",
           "MOE_REQUEST_TIMEOUT_S": "2.5", "MOE_MAX_N": "4", "MOE_READY_FILE": "/tmp/r.json"}
    settings = parse(["--max-n", "8"], env)
    assert settings.router == ["a:1", "[::1]:2"]
    assert (settings.port, settings.model_name, settings.request_timeout_s) == (0, "mixtral", 2.5)
    assert (settings.max_n, settings.ready_file) == (8, "/tmp/r.json")


@pytest.mark.parametrize(("extra", "problem"), [
    ({"port": "70000"}, "--port"),
    ({"port": "-1"}, "--port"),
    ({"port": "eighty"}, "--port"),
    ({"router": ["no-port"]}, "--router"),
    ({"router": ["host:0"]}, "--router"),
    ({"router": ["a b:1"]}, "--router"),
    ({"request_timeout_s": "0"}, "--request-timeout-s"),
    ({"max_body_bytes": "0"}, "--max-body-bytes"),
    ({"max_n": "0"}, "--max-n"),
    ({"max_stop_sequences": "-1"}, "--max-stop-sequences"),
    ({"max_choices": "4"}, "--max-choices"),
    ({"log_level": "loud"}, "--log-level"),
])
def test_bad_values_name_the_setting(tmp_path: Path, extra: dict, problem: str):
    flags = {"model": str(tmp_path), "router": ["localhost:1"], **extra}
    with pytest.raises(SettingsError, match=problem):
        settings_from(GatewaySettings, flags, {})


def test_required_settings(tmp_path: Path):
    with pytest.raises(SettingsError, match="--router / MOE_ROUTER is required"):
        settings_from(GatewaySettings, {"model": str(tmp_path)}, {})
    with pytest.raises(SettingsError, match="--model"):
        settings_from(GatewaySettings, {"model": str(tmp_path / "missing"), "router": ["a:1"]}, {})


def test_help_documents_every_setting(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in GatewaySettings.__dataclass_fields__:
        assert flag_name(name) in text
        assert f"MOE_{name.upper()}" in text.replace("\n", "").replace(" ", "")
