# Quick start: `make demo` then `make test`. Both create .venv when it is missing.
SHELL  := /bin/bash
VENV   ?= .venv
PY     := $(VENV)/bin/python
# faiss-gpu where nvidia-smi sees a GPU, faiss-cpu elsewhere.
EXTRA  := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.lakelens-$(EXTRA)
DEMO   ?= demo-out
PYTEST_ARGS ?= -m "not slow"

.PHONY: install browser demo test test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[$(EXTRA),dev]'
	touch $@

# The web page's test drives Debian's headless Chromium through its chromedriver
# (Selenium); installed once with apt-get (as root, or with sudo), skipped when present.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver; }

demo: $(STAMP)
	$(VENV)/bin/lakelens demo --out $(DEMO)

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

BENCHES := decode annotate first_chunk annotate_memory index index_scale filtered serve serve_scale train nightly placement scale

# Each benchmark's default run; its last stdout line (one JSON object) goes to
# benchmarks/results/NAME.json.
bench: $(STAMP)
	mkdir -p benchmarks/results
	set -eo pipefail; for b in $(BENCHES); do \
	  $(PY) benchmarks/$$b.py | tee benchmarks/results/$$b.log; \
	  tail -n 1 benchmarks/results/$$b.log > benchmarks/results/$$b.json; \
	done

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
