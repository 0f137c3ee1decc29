"""`moe-serve deploy render`: the YAML it writes, what a placement turns into, and that the committed
deploy/k8s/base, docker-compose.yml and deploy/docker/placement.json are exactly what it renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.errors import ConfigError
from moe_serve import cli
from moe_serve.deploy import cli as deploy_cli
from moe_serve.deploy.spec import load_shards, placement_text, service_name
from moe_serve.deploy.yamlout import dump, dump_all

REPO = Path(__file__).resolve().parents[2]
RERENDER = ("run `moe-serve deploy render --target k8s` and `moe-serve deploy render --target compose` "
            "in the repository root")

TRICKY = ["", "yes", "No", "on", "OFF", "y", "null", "~", "true", "8000:8000", "80:80", "0.0.0.0", "1e3", "0x1f",
          "-m", "--port", "a: b", "a #b", "#x", "@x", "*x", "&x", "!x", "%x", "{x}", "[x]", "x:", "x: ", " x",
          "x ", "'q'", '"q"', "two\nlines", "two\nlines\n", "two\n\n", "\n lead", "tab\there", "é ü", "=", "a=b",
          "${MOE_X:-1}", "redis://redis:6379/0", "shard-0=expert-shard-0:50051", "0-3", "007", "1_000", "12:30"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.sampled_from(TRICKY),
                    st.text(max_size=12))
keys = st.one_of(st.sampled_from(TRICKY[1:]), st.text(min_size=1, max_size=8))
trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, trees, max_size=5) | st.lists(trees, min_size=1, max_size=5))
def test_yaml_round_trips_through_pyyaml(doc):
    assert yaml.safe_load(dump(doc)) == doc


def test_yaml_multiline_text_is_a_literal_block():
    text = dump({"data": {"placement.json": '{\n  "a": 1\n}\n'}, "x": [{"k": "one\ntwo"}]})
    assert "placement.json: |\n" in text and "k: |-\n" in text
    assert [d["k"] for d in yaml.safe_load_all(dump_all([{"k": 1}, {"k": 2}]))] == [1, 2]


def render(target: str, *flags: str) -> dict[str, str]:
    args = cli.build_parser().parse_args(["deploy", "render", "--target", target, *flags])
    return deploy_cli.render_files(args)


def test_committed_manifests_are_what_the_generator_renders():
    files = render("k8s", "--dashboards", str(REPO / "deploy/grafana/dashboards"))
    base = REPO / "deploy/k8s/base"
    assert sorted(p.name for p in base.iterdir()) == sorted(files), RERENDER
    for name, text in files.items():
        assert (base / name).read_text() == text, f"deploy/k8s/base/{name} is out of date: {RERENDER}"
    for name, text in render("compose").items():
        assert (REPO / name).read_text() == text, f"{name} is out of date: {RERENDER}"


def test_check_flag_reports_stale_files(tmp_path, monkeypatch, capsys):
    out = tmp_path / "base"
    assert cli.main(["deploy", "render", "--target", "k8s", "--out", str(out), "--dashboards", str(tmp_path)]) == 0
    flags = ["deploy", "render", "--target", "k8s", "--out", str(out), "--dashboards", str(tmp_path), "--check"]
    assert cli.main(flags) == 0
    (out / "router.yaml").write_text("# edited\n")
    (out / "expert-shard-7.yaml").write_text("# left over\n")
    assert cli.main(flags) == 1
    err = capsys.readouterr().err
    assert "router.yaml" in err and "expert-shard-7.yaml" in err


def placement_file(tmp_path: Path, shards: list[dict]) -> Path:
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"shards": shards}))
    return path


def test_a_placement_makes_one_workload_per_shard(tmp_path):
    shards = [{"id": "shard-0", "experts": {"0": [0, 1, 2], "1": "0-2"}}, {"id": "shard-1", "experts": "3-5"},
              {"id": "hot", "experts": "6,7,0"}]
    path = placement_file(tmp_path, shards)
    files = render("k8s", "--placement", str(path), "--replicas", "2", "--image", "reg.example/moe:1",
                   "--dashboards", str(tmp_path / "none"))
    assert {"expert-shard-0.yaml", "expert-shard-1.yaml", "expert-hot.yaml"} <= set(files)
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert {"expert-shard-0.yaml", "expert-shard-1.yaml", "expert-hot.yaml"} <= set(kustomization["resources"])
    placement = json.loads(files["placement.json"])
    assert [s["replicas"] for s in placement["shards"]] == [["expert-shard-0:50051"], ["expert-shard-1:50051"],
                                                             ["expert-hot:50051"]]
    assert placement["shards"][0]["experts"] == {"0": [0, 1, 2], "1": "0-2"}  # passed through
    docs = list(yaml.safe_load_all(files["expert-hot.yaml"]))
    deployment, service, _, autoscaler = docs
    assert deployment["spec"]["replicas"] == 2 and autoscaler["spec"]["minReplicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg.example/moe:1"
    assert container["args"][-2:] == ["--shard-id", "hot"]
    assert service["spec"]["clusterIP"] == "None"
    compose = yaml.safe_load(render("compose", "--placement", str(path), "--replicas", "2")["docker-compose.yml"])
    assert {"expert-hot", "expert-hot-gpu"} <= set(compose["services"])
    assert compose["services"]["expert-hot"]["deploy"]["replicas"] == "${MOE_EXPERT_REPLICAS:-2}"


def test_shards_and_model_checks(tmp_path, demo_model):
    assert [s.experts for s in load_shards(shards=4)] == ["0-1", "2-3", "4-5", "6-7"]
    assert [s.experts for s in load_shards(model=demo_model, shards=3)] == ["0-2", "3-4", "5-7"]
    assert [s.shard_id for s in load_shards()] == ["shard-0", "shard-1"]
    bad = placement_file(tmp_path, [{"id": "shard-0", "experts": "0-9"}])
    load_shards(bad)  # without a model the placement is taken as written
    with pytest.raises(ConfigError, match="outside"):
        load_shards(bad, model=demo_model)
    with pytest.raises(ConfigError, match="no 'experts'"):
        load_shards(placement_file(tmp_path, [{"id": "shard-0"}]))
    with pytest.raises(ConfigError, match="clashing"):
        load_shards(placement_file(tmp_path, [{"id": "a_b", "experts": "0"}, {"id": "a-b", "experts": "1"}]))
    assert service_name("Shard_A") == "expert-shard-a"
    with pytest.raises(ConfigError):
        service_name("x" * 70)


def test_ffn_slices_reach_the_containers_placement(tmp_path):
    halves = [{"id": f"shard-{p}", "experts": "all", "ffn": f"{p}/2"} for p in range(2)]
    shards = load_shards(placement_file(tmp_path, halves))
    written = json.loads(placement_text(shards))["shards"]
    assert [(s["id"], s["experts"], s["ffn"]) for s in written] == [("shard-0", "all", "0/2"),
                                                                   ("shard-1", "all", "1/2")]
    assert "ffn" not in json.loads(placement_text(load_shards()))["shards"][0]
    with pytest.raises(ConfigError, match="cannot read ffn slice"):
        load_shards(placement_file(tmp_path, [{"id": "shard-0", "experts": "all", "ffn": "half"}]))


def test_rendering_fewer_shards_removes_old_ones(tmp_path):
    out = tmp_path / "base"
    flags = ["deploy", "render", "--target", "k8s", "--out", str(out), "--dashboards", str(tmp_path)]
    assert cli.main([*flags, "--shards", "3"]) == 0
    assert (out / "expert-shard-2.yaml").exists()
    assert cli.main([*flags, "--shards", "2"]) == 0
    assert not (out / "expert-shard-2.yaml").exists()


def test_dashboards_become_configmaps(tmp_path):
    boards = tmp_path / "dashboards"
    boards.mkdir()
    (boards / "MoE Overview.json").write_text('{\n  "title": "MoE"\n}\n')
    docs = list(yaml.safe_load_all(render("k8s", "--dashboards", str(boards))["grafana-dashboards.yaml"]))
    assert docs[0]["metadata"]["name"] == "grafana-dashboard-moe-overview"
    assert docs[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert docs[0]["data"] == {"MoE Overview.json": '{\n  "title": "MoE"\n}\n'}
