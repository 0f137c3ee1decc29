"""`python -m bench.cache_cost`: the expert cache's own cost per layer step, native index or Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from router_service import row_keys

FIELDS = {"rows", "mode", "index", "layer_steps", "cache_us_per_row", "cache_us_per_layer_step",
          "backend_us_per_layer_step"}


@pytest.mark.parametrize("python_index", [False, True], ids=["native", "python"])
def test_it_reports_each_size_with_its_index(python_index):
    if not python_index and row_keys.library() is None:
        pytest.skip("no C++ compiler here: the native index cannot be built")
    argv = [sys.executable, "-m", "bench.cache_cost", "--rows", "1", "40", "--row-budget", "400", "--local-mib", "4"]
    out = subprocess.run(argv + (["--python-index"] if python_index else []), capture_output=True, text=True,
                         check=True, env={**os.environ, "MOE_ROW_CACHE": "auto"}).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["rows"] for line in lines] == [1, 40]
    for line in lines:
        assert set(line) == FIELDS and line["index"] == ("python" if python_index else "native")
        assert line["layer_steps"] >= 160 and line["cache_us_per_layer_step"] > 0 and line["cache_us_per_row"] > 0
