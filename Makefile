# All set-up happens here, from nothing: `make run` and `make test` create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sourcebox-installed

.PHONY: run lint test bench bench-quick fuzz soak clean venv

venv: $(STAMP)

# torch goes first and pinned: any looser spec pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) examples/run_example.py

# The rule set and why: pyproject.toml, [tool.ruff].
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests
	$(PY) -m benchmarks --quick --out $(VENV)/bench-smoke

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

# Issue 11's harnesses (docs/RUNNER.md, "Fuzz and soak"); both exit non-zero on any failure.
fuzz: $(STAMP)
	$(PY) -m fuzz

soak: $(STAMP)
	$(PY) -m fuzz soak

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
