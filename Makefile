VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test test-fast bench

setup:
	bash scripts/setup.sh

serve: setup
	$(VENV)/bin/ascend-llm serve

test: setup
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/bench_offline.py
