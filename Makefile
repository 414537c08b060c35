# The two commands a new user runs (README): `make demo` and `make test`.
# Both create or reuse the git-ignored virtual environment .venv/ and install the project into it once;
# the stamp files make a second call skip the install (they are rebuilt only when pyproject.toml changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
OUT    ?= runs/demo

.PHONY: demo test lint bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[test,parity]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m sib demo --out $(OUT) --overwrite

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(PY) -m ruff check src tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_step.py

clean-venv:
	rm -rf $(VENV)
