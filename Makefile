# fedsparse: the two commands of the README are `make run` and `make test`.
# Both create .venv when it is missing and install only when pyproject.toml (or the torch pin)
# changed since the last install.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned so that pip never pulls a CUDA build by accident.
# GPU users: make run TORCH_VERSION=2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PROFILE ?= quick
RESULTS ?= results
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsparse-installed-torch-$(TORCH_VERSION)
TORCH_PIP_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.PHONY: run test install benchmarks clean-results

run: $(STAMP)
	$(BIN)/fedsparse run --profile $(PROFILE) --out $(RESULTS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	rm -f $(VENV)/.fedsparse-installed-torch-*
	$(BIN)/python -m pip install --disable-pip-version-check "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m pip check
	$(BIN)/python -m ipykernel install --sys-prefix --name fedsparse --display-name "Python 3 (fedsparse)"
	touch $@

clean-results:
	rm -rf $(RESULTS)
