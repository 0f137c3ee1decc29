"""API keys: every route but health, metrics and the schema needs one; compared in constant time; never shown."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from starlette.routing import BaseRoute

from gateway import auth
from gateway.auth import OPEN_PATHS, ApiKeys
from gateway.settings import GatewaySettings
from moe_core.settings import SettingsError, parse_settings, settings_from
from tests.unit.gateway_fakes import Harness

KEY, OTHER = "sk-test-0123456789abcdef", "sk-second-key"
UNAUTHORIZED = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
BODIES = {
    "/v1/completions": {"model": "demo", "prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}


@pytest.fixture(scope="module")
def harness(demo_model):
    with Harness(demo_model, api_keys=[KEY, OTHER]) as h:
        yield h


def concrete(path: str) -> str:
    """A request path for a route template: `{name}` and `{name:path}` parameters become `demo`."""
    parts = [("demo" if part.startswith("{") else part) for part in path.split("/")]
    return "/".join(parts)


def all_routes(routes: list[BaseRoute]) -> list[tuple[str, str]]:
    """(method, path) for every route of the app, so that a route added later is covered too."""
    found = [(method, concrete(route.path)) for route in routes for method in sorted(getattr(route, "methods", ()))]
    assert len(found) >= len(routes)
    return found


def guarded(harness: Harness) -> list[tuple[str, str]]:
    return [(method, path) for method, path in all_routes(harness.app.routes) if path not in OPEN_PATHS]


def call(client: httpx.Client, method: str, path: str, key: str | None = None,
         authorization: str | None = None) -> httpx.Response:
    headers = {"Authorization": authorization or f"Bearer {key}"} if key or authorization else {}
    return client.request(method, path, json=BODIES.get(path) if method == "POST" else None, headers=headers)


def test_every_v1_route_is_guarded_and_only_probes_are_open(harness: Harness):
    routes = all_routes(harness.app.routes)
    v1 = {path for _, path in routes if path.startswith("/v1/")}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/demo"} <= v1
    assert {path for _, path in routes} - {path for _, path in guarded(harness)} == set(OPEN_PATHS)


@pytest.mark.parametrize(("credentials", "missing"), [
    (None, True), ("Bearer", True), (f"Basic {KEY}", True), (f"Token {KEY}", True), (KEY, True),
    ("Bearer wrong-key", False), (f"Bearer {KEY}x", False), (f"bearer {KEY[:-1]}", False), (f"Bearer {KEY} x", False),
])
def test_missing_or_wrong_keys_are_401(harness: Harness, credentials: str | None, missing: bool):
    sent = len(harness.fake.requests)
    with httpx.Client(base_url=harness.url) as client:
        for method, path in guarded(harness):
            response = call(client, method, path, authorization=credentials)
            assert response.status_code == 401, (method, path)
            error = response.json()["error"]
            assert {k: error[k] for k in UNAUTHORIZED} == UNAUTHORIZED
            assert ("didn't provide" in error["message"]) == missing
            assert response.headers["www-authenticate"] == "Bearer"
            assert KEY not in response.text
    assert len(harness.fake.requests) == sent  # nothing reached the router


def test_the_right_keys_work_on_every_route(harness: Harness):
    with httpx.Client(base_url=harness.url) as client:
        for key in (KEY, OTHER):
            for method, path in guarded(harness):
                assert call(client, method, path, key).status_code != 401, (method, path)
            assert call(client, "POST", "/v1/completions", key).status_code == 200
            assert call(client, "POST", "/v1/chat/completions", key).status_code == 200
            assert call(client, "GET", "/v1/models", key).json()["data"][0]["id"] == "demo"
        assert call(client, "GET", "/v1/models", authorization=f"bearer   {KEY}").status_code == 200


def test_probes_metrics_and_schema_need_no_key(harness: Harness):
    with httpx.Client(base_url=harness.url) as client:
        for path in OPEN_PATHS:
            assert client.get(path).status_code == 200, path
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 200


def test_a_key_file_works(demo_model, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text(f"# production keys\n\n  {KEY}  \n#{OTHER}\n")
    with Harness(demo_model, api_keys_file=str(keys)) as h, httpx.Client(base_url=h.url) as client:
        assert call(client, "GET", "/v1/models", KEY).status_code == 200
        assert call(client, "GET", "/v1/models", OTHER).status_code == 401  # commented out
        assert call(client, "GET", "/v1/models", "# production keys").status_code == 401
        assert call(client, "GET", "/v1/models").status_code == 401


def test_empty_moe_api_keys_means_no_authentication(demo_model, tmp_path: Path):
    env = {"MOE_MODEL": str(demo_model), "MOE_ROUTER": "127.0.0.1:1", "MOE_API_KEYS": ""}
    settings = parse_settings(GatewaySettings, [], env=env)
    assert settings.api_keys == [] and not ApiKeys(settings.configured_keys()).enabled
    env["MOE_API_KEYS"] = f" {KEY} ,{OTHER},"
    assert parse_settings(GatewaySettings, [], env=env).configured_keys() == [KEY, OTHER]
    with Harness(demo_model, api_keys=[]) as h, httpx.Client(base_url=h.url) as client:
        assert call(client, "POST", "/v1/completions").status_code == 200
        assert call(client, "GET", "/v1/models", authorization="Bearer anything").status_code == 200


@pytest.mark.parametrize(("flags", "problem"), [
    ({"api_keys": ["has space"]}, "--api-keys"),
    ({"api_keys": ["caf\u00e9"]}, "--api-keys"),
    ({"api_keys_file": "/nonexistent/keys"}, "--api-keys-file"),
])
def test_bad_keys_are_refused_without_showing_them(tmp_path: Path, flags: dict, problem: str):
    with pytest.raises(SettingsError, match=problem) as info:
        settings_from(GatewaySettings, {"model": str(tmp_path), "router": ["a:1"], **flags}, {})
    assert "space" not in str(info.value).replace("spaces", "") and "caf" not in str(info.value)


def test_a_key_file_with_no_key_is_an_error(tmp_path: Path):
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(SettingsError, match="holds no key"):
        settings_from(GatewaySettings, {"model": str(tmp_path), "router": ["a:1"], "api_keys_file": str(empty)}, {})


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch: pytest.MonkeyPatch):
    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys(["first", "second", "third"])
    for presented, expected in ((b"first", "first"), (b"third", "third"), (b"fourth", None), (b"", None)):
        compared.clear()
        match = keys.match(presented)
        assert match == (hashlib.sha256(expected.encode()).digest() if expected else None)
        assert len(compared) == 3  # no early exit at a match
        assert all(len(a) == len(b) == 32 for a, b in compared)  # digests: the key's length does not show


def test_key_ids_are_a_digest_prefix():
    assert auth.key_id(hashlib.sha256(KEY.encode()).digest()) == hashlib.sha256(KEY.encode()).hexdigest()[:6]
