# Two commands for users: `make demo` and `make test`. Both set up .venv on first use.
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= outputs/demo
DATA_DIR ?= data/fashion_mnist

.PHONY: install test test-all demo bench lint clean

# Re-install only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	@test -x $(PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

# Includes the tests marked slow.
test-all: $(VENV)/.installed
	$(PYTHON) -m pytest -q -m "not gpu"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dino_hf scripts tests benchmarks

demo: $(VENV)/.installed
	@echo "make demo: not yet available (the training loop has not landed)."

bench: $(VENV)/.installed
	$(PYTHON) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
