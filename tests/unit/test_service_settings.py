from __future__ import annotations

import subprocess
import sys

import pytest

from expert_service.settings import ExpertSettings
from moe_core.settings import SettingsError, as_argv, build_parser, settings_from
from router_service.settings import RouterSettings


def parse(cls, argv, env=None):
    return settings_from(cls, vars(build_parser(cls).parse_args(argv)), env or {})


def test_router_flags_env_and_defaults():
    s = parse(RouterSettings, ["--model", "m", "--shard", "a=h:1,h:2", "--shard", "b=h:3"],
              {"MOE_MAX_NUM_SEQS": "8", "MOE_RPC_TIMEOUT_S": "2.5"})
    assert s.shard_addresses() == {"a": ["h:1", "h:2"], "b": ["h:3"]}
    assert (s.max_num_seqs, s.rpc_timeout_s, s.port, s.experts) == (8, 2.5, 50050, "grpc")
    assert parse(RouterSettings, as_argv(s)) == s
    assert parse(RouterSettings, ["--model", "m", "--experts", "local"]).shard == []


@pytest.mark.parametrize("argv,env,message", [
    (["--model", "m"], {}, "give the shards with --shard"),
    (["--model", "m", "--experts", "local", "--shard", "a=h:1"], {}, "--shard/--placement need --experts grpc"),
    (["--model", "m", "--shard", "a"], {}, "is not 'name=host:port"),
    (["--model", "m", "--experts", "local"], {"MOE_KV_CACHE_MIB": "0"}, "--kv-cache-mib / MOE_KV_CACHE_MIB: must be"),
    (["--model", "m", "--experts", "local", "--port", "99999"], {}, "not a TCP port"),
    ([], {}, "--model / MOE_MODEL is required"),
])
def test_router_bad_values(argv, env, message):
    with pytest.raises(SettingsError, match=message):
        parse(RouterSettings, argv, env)


def test_expert_settings():
    s = parse(ExpertSettings, ["--model", "m", "--experts", "0-3"], {"MOE_SHARD_ID": "shard-7", "MOE_PORT": "0"})
    assert (s.shard_id, s.port, s.experts, s.ffn) == ("shard-7", 0, "0-3", "0/1")
    assert parse(ExpertSettings, ["--model", "m", "--experts", "all", "--ffn", "1/2"]).ffn == "1/2"
    for argv, message in [(["--model", "m"], "exactly one of --experts or --placement"),
                          (["--model", "m", "--experts", "1", "--placement", "p"], "exactly one"),
                          (["--model", "m", "--placement", "p", "--layers", "0"], "--layers only goes with"),
                          (["--model", "m", "--placement", "p", "--ffn", "1/2"], "--ffn only goes with")]:
        with pytest.raises(SettingsError, match=message):
            parse(ExpertSettings, argv)


@pytest.mark.parametrize("module", ["expert_service", "router_service", "gateway"])
def test_help_documents_every_setting(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
    cls = {"expert_service": ExpertSettings, "router_service": RouterSettings}.get(module)
    if cls is not None:
        for name in cls.__dataclass_fields__:
            assert f"--{name.replace('_', '-')}" in result.stdout and f"MOE_{name.upper()}" in result.stdout


def test_bad_value_exits_with_a_clear_message():
    result = subprocess.run([sys.executable, "-m", "router_service", "--model", "m", "--experts", "local",
                             "--max-num-seqs", "many"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--max-num-seqs / MOE_MAX_NUM_SEQS: expected int, got 'many'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_expert_service_takes_its_ffn_slice_from_flags_or_its_placement(tmp_path):
    from expert_service.server import shard_spec
    from moe_core.config import config_from_dict
    from moe_core.errors import ConfigError
    from moe_core.placement import ffn_split, write_placement

    cfg = config_from_dict({"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_local_experts": 4,
                            "num_experts_per_tok": 2})
    spec = shard_spec(parse(ExpertSettings, ["--model", "m", "--experts", "all", "--ffn", "1/2"]), cfg)
    assert spec.ffn == (1, 2) and len(spec.pairs) == 8
    with pytest.raises(ConfigError, match="cannot cut an FFN of 6 into 7"):
        shard_spec(parse(ExpertSettings, ["--model", "m", "--experts", "all", "--ffn", "0/7"]), cfg)
    write_placement(tmp_path / "p.json", ffn_split(cfg, 3))
    spec = shard_spec(parse(ExpertSettings, ["--model", "m", "--placement", str(tmp_path / "p.json"),
                                             "--shard-id", "shard-2"]), cfg)
    assert spec.ffn == (2, 3) and len(spec.pairs) == 8
