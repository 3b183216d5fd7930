# Two entry points: `make demo` (set up, then build and run the built-in example model)
# and `make test` (set up with the test dependencies, then run the test suite).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# Files holding tests marked `serial` (timing-sensitive): run alone after the parallel run, collected on their own
SERIAL_TESTS = tests/runtime/test_cpu_overhead.py

.PHONY: demo test setup test-setup clean

demo: setup
	$(BIN)/kiln demo --output-dir out/demo

test: test-setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile -m 'not slow and not serial'
	$(BIN)/python -m pytest -q -m 'serial and not slow' $(SERIAL_TESTS)

setup: $(VENV)/.kiln-installed
test-setup: $(VENV)/.kiln-test-installed

$(VENV)/.kiln-installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e . onnxruntime
	touch $@

$(VENV)/.kiln-test-installed: $(VENV)/.kiln-installed scripts/install-test-deps.sh
	bash scripts/install-test-deps.sh $(BIN)
	touch $@

clean:
	rm -rf $(VENV) out
