# make run  : create .venv, install, build the offline tiny model if missing, serve local.yaml
# make test : same set-up, then lint and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MODEL_DIR ?= models/tiny-llama
SMALL_MODEL_DIR ?= models/small-llama
CONFIG ?= serve_configs/local.yaml
PYTEST_ARGS ?=

.PHONY: setup model small-model run test lint unit integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	# CUDA builds pulled in with torch break transformers' imports on CPU torch (DESIGN.md).
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: app/tiny_model.py | $(STAMP)
	$(PY) -m app.tiny_model --size tiny --out $(MODEL_DIR) --force

small-model: $(SMALL_MODEL_DIR)/config.json

$(SMALL_MODEL_DIR)/config.json: app/tiny_model.py | $(STAMP)
	$(PY) -m app.tiny_model --size small --out $(SMALL_MODEL_DIR) --force

# The Ray settings of app/serve_env.py (HAProxy in front) must be set before Ray starts.
# app.port_guard first: a stale HAProxy of a killed run is stopped, any other holder of the
# ports is named in one line (exit 2) instead of a traceback. After serve run exits (Ctrl-C:
# the trap keeps this shell alive, serve run still gets the signal), `--after` stops a HAProxy
# that Ray's own shutdown orphaned.
run: setup model
	$(PY) -m app.serve_env --local $(PY) -m app.port_guard $(CONFIG)
	trap true INT; $(PY) -m app.serve_env --local $(VENV)/bin/serve run $(CONFIG); \
	status=$$?; $(PY) -m app.serve_env --local $(PY) -m app.port_guard --after $(CONFIG); \
	exit $$status

lint: setup
	$(VENV)/bin/ruff check .

test: setup model lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

integration: setup model
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

bench: setup model
	$(PY) bench/serving_overhead.py

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache
