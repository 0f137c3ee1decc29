"""Settings never crash on odd input: any value is accepted or refused with a SettingsError naming it."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from expert_service.settings import ExpertSettings
from moe_core.settings import SettingsError, as_argv, build_parser, env_name, settings_from
from router_service.settings import RouterSettings

BASE = {RouterSettings: {"MOE_MODEL": "m", "MOE_EXPERTS": "local"}, ExpertSettings: {"MOE_MODEL": "m",
                                                                                     "MOE_EXPERTS": "0-3"}}


def fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("help") is not None]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([RouterSettings, ExpertSettings]), st.data())
def test_any_environment_value_is_accepted_or_clearly_refused(cls, data):
    name = data.draw(st.sampled_from(fields(cls)))
    value = data.draw(st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                                st.floats(allow_nan=True).map(str), st.sampled_from(["", "true", "0", "-1", "1e3"])))
    env = {**BASE[cls], env_name(name): value}
    try:
        parsed = settings_from(cls, {}, env)
    except SettingsError as exc:
        assert "MOE_" in str(exc)
        return
    assert isinstance(parsed, cls)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 512), st.booleans(), st.sampled_from(["off", "local"]),
       st.floats(0.1, 600, allow_nan=False))
def test_router_settings_round_trip_through_flags(kv, seqs, overlap, cache, timeout):
    original = settings_from(RouterSettings, {}, {**BASE[RouterSettings], "MOE_KV_CACHE_MIB": str(kv),
                                                  "MOE_MAX_NUM_SEQS": str(seqs), "MOE_OVERLAP": str(overlap),
                                                  "MOE_CACHE": cache, "MOE_RPC_TIMEOUT_S": repr(timeout)})
    again = settings_from(RouterSettings, vars(build_parser(RouterSettings).parse_args(as_argv(original))), {})
    assert again == original
