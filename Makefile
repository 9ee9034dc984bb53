# Two entry points (README): `make demo` runs the local P/D deployment, `make test` the tests.
# Both create .venv on first use (CPU torch; bring your own CUDA torch by installing it first).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo up test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/hybridpd demo

up: $(STAMP)
	$(BIN)/hybridpd up

test: $(STAMP)
	$(BIN)/ruff check hybridpd tests bench
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile

clean:
	rm -rf $(VENV)
