# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs moelens, traces the shipped model and prints what it found
#   make test   creates .venv, installs moelens with its test extras, runs the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.moelens-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m moelens.demo --out runs/demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks.trace_overhead
	$(BIN)/python -m benchmarks.store_size
	$(BIN)/python -m benchmarks.routing_kernel
	$(BIN)/python -m benchmarks.intervention_overhead
	$(BIN)/python -m benchmarks.analysis_throughput

clean:
	rm -rf runs build dist *.egg-info
