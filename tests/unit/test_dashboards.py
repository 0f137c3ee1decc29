"""The Grafana dashboards and provisioning in deploy/grafana are valid, consistent and current.

The helpers here (panel queries with their variables substituted) are also used by
tests/integration/test_observability.py, which runs every query against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DS_UID = "moe-prometheus"
# What Grafana puts in for its built-in variables when the test runs a query itself.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__range_s": "300"}
VAR = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")
METRIC = re.compile(r"\b(moe_\w+|process_\w+|up)\b")
DOCUMENTED = set(re.findall(r"`(moe_\w+)`", (ROOT / "docs" / "metrics.md").read_text()))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for p in board["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # panels inside collapsed rows
    return panels


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def used_variables(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in VAR.finditer(text)}


def substitute(expr: str, board: dict[str, Any], values: dict[str, str] | None = None) -> str:
    """The query Grafana would send: built-ins and dashboard variables replaced (All -> its allValue)."""
    chosen = dict(BUILTINS)
    for name, var in variables(board).items():
        if var.get("includeAll"):
            chosen[name] = var.get("allValue", ".*")
        elif isinstance(var.get("current", {}).get("value"), str):
            chosen[name] = var["current"]["value"]
    chosen |= values or {}

    def repl(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        if name not in chosen:
            raise KeyError(f"undefined variable ${name} in {expr}")
        return chosen[name]

    return VAR.sub(repl, expr)


def panel_queries(board: dict[str, Any], values: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(panel title, refId, query ready to run) for every target of every panel."""
    return [(p["title"], t["refId"], substitute(t["expr"], board, values))
            for p in all_panels(board) for t in p.get("targets", [])]


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, label, metric) of every `label_values(metric, label)` query variable."""
    out = []
    for name, var in variables(board).items():
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, f"variable {name}: only label_values(metric, label) is supported here"
            out.append((name, m.group(2), m.group(1)))
    return out


@pytest.fixture(params=DASHBOARD_FILES, ids=[p.stem for p in DASHBOARD_FILES])
def board(request) -> dict[str, Any]:
    return load(request.param)


def test_the_three_dashboards_exist_with_unique_uids():
    boards = [load(p) for p in DASHBOARD_FILES]
    assert {p.stem for p in DASHBOARD_FILES} == {"expert-utilization", "serving", "cluster"}
    uids = [b["uid"] for b in boards]
    assert len(set(uids)) == len(uids) and all(0 < len(u) <= 40 for u in uids)


def test_committed_dashboards_are_what_the_generator_writes():
    run = subprocess.run([sys.executable, str(GRAFANA / "generate.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_dashboard_structure(board):
    assert board["schemaVersion"] >= 36
    assert board["title"] and board["uid"] and "moe-serve" in board["tags"]
    ids = [p["id"] for p in all_panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels(board):
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["type"] == "prometheus", p["title"]
        assert p["targets"], f"{p['title']}: no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), f"{p['title']}: a target without expr"
            assert t["datasource"] == p["datasource"], f"{p['title']}: target datasource differs from the panel's"


def test_panels_do_not_overlap(board):
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels(board):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_datasource_by_uid_everywhere(board):
    """Every panel, target and query variable names the data source by uid: the `datasource` variable,
    which defaults to the provisioned uid."""
    ds_var = variables(board)["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    assert ds_var["current"]["value"] == DS_UID
    refs = [p["datasource"] for p in all_panels(board) if p["type"] != "row"]
    refs += [t["datasource"] for p in all_panels(board) for t in p.get("targets", [])]
    refs += [v["datasource"] for v in variables(board).values() if v["type"] == "query"]
    for ref in refs:
        assert set(ref) == {"type", "uid"} and ref["uid"] in ("${datasource}", DS_UID), ref


def test_every_used_variable_is_defined(board):
    defined = set(variables(board)) | set(BUILTINS)
    texts = [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]
    texts += [p["title"] for p in all_panels(board)]
    texts += [v.get("definition", "") for v in variables(board).values()]
    for text in texts:
        assert used_variables(text) <= defined, f"undefined variable in {text!r}"
    for name in variables(board):
        if name != "datasource":
            assert any(name in used_variables(text) for text in texts), f"variable ${name} is never used"
    panel_queries(board)  # substitution leaves nothing undefined


def test_queries_use_only_documented_metrics(board):
    """Every moe_ metric a panel reads is in docs/metrics.md (histograms through their _bucket/_count)."""
    for title, _, expr in panel_queries(board):
        for name in METRIC.findall(expr):
            if name.startswith("moe_"):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert name in DOCUMENTED or base in DOCUMENTED, f"{title}: {name} is not in docs/metrics.md"


def test_the_expert_dashboard_has_the_layers_by_experts_heatmap():
    board = load(GRAFANA / "dashboards" / "expert-utilization.json")
    table = next(p for p in all_panels(board) if p["type"] == "table")
    (matrix,) = table["transformations"]
    assert matrix["id"] == "groupingToMatrix"
    assert (matrix["options"]["rowField"], matrix["options"]["columnField"]) == ("layer", "expert")
    assert "sum by (layer, expert)" in table["targets"][0]["expr"]
    assert any(p["type"] == "heatmap" for p in all_panels(board))


def test_provisioning_points_at_the_dashboards_and_the_uid():
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (DS_UID, "prometheus", "http://prometheus:9090")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "moe-serve.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_local_grafana_provisioning(tmp_path):
    from moe_serve.prometheus import DASHBOARDS, write_grafana_provisioning

    folder = write_grafana_provisioning(tmp_path / "grafana", "http://127.0.0.1:9999")
    source = yaml.safe_load((folder / "datasources" / "moe-serve.yml").read_text())["datasources"][0]
    assert (source["uid"], source["url"]) == (DS_UID, "http://127.0.0.1:9999")
    provider = yaml.safe_load((folder / "dashboards" / "moe-serve.yml").read_text())["providers"][0]
    assert Path(provider["options"]["path"]) == DASHBOARDS and DASHBOARDS.is_dir()
