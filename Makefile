# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel; GPU users install their CUDA build of torch first and the project's open spec accepts it.
TORCH  ?= torch==2.13.0
PROMPT ?= Once upon a time, the router

.PHONY: demo test lint clean device-wheels

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

# Wheels for a lent GPU machine, which has Python 3.12, torch and most of our needs but reaches no registry:
# the rest, at this environment's versions, into .whl/ (bench/device_check.sh installs them there).
DEVICE_WHEELS = fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection \
	typing-extensions anyio opentelemetry-api uvicorn h11 click redis hiredis grpcio grpcio-health-checking protobuf
device-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 -d .whl $$($(PY) -c 'import sys, importlib.metadata as m; \
		print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(DEVICE_WHEELS))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .whl
