# Two commands do all set-up on a fresh machine:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-cluster lint typecheck venv clean

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev,eval]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

# The Slurm and two-node tests alone (root, slurm-wlm, munge, iproute2; see docs/cluster-guide.md).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 -m cluster tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy salt_megatron tools benchmarks tests pretrain_salt.py

clean:
	rm -rf $(VENV) runs cache
