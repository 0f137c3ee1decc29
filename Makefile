# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel; GPU users install their CUDA build of torch first and the project's open spec accepts it.
TORCH  ?= torch==2.13.0
PROMPT ?= Once upon a time, the router

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: a local cluster (gateway, router, 2 expert shards) on the demo model, asked one question;
# it keeps serving until Ctrl-C. CI=true (or EXIT=1) stops it after the answer.
demo: $(STAMP)
	$(VENV)/bin/moe-serve up --ask "$(PROMPT)" $(if $(or $(EXIT),$(filter true,$(CI))),--exit-after-ask)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
