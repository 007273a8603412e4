# Two-command quickstart: `make up` runs the whole loop on embedded defaults, `make test` runs the tests.
# Both create the virtual environment on first use (torch 2.13.0 first, then the project in one resolve).

PYTHON ?= python3
# Where torch comes from. Empty: wherever pip is configured to look (on the public PyPI index, Linux x86_64
# gets the CUDA build with several GB of NVIDIA libraries). For the CPU-only build (a ~190 MB wheel):
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu
# It applies when .venv is created; `make clean` first to switch.
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test lint bench-help clean

$(BIN)/streamengine: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

up: $(BIN)/streamengine
	$(BIN)/streamengine up

test: $(BIN)/streamengine
	$(BIN)/python -m pytest

lint: $(BIN)/streamengine
	$(BIN)/ruff check streamengine tests bench
	$(BIN)/mypy streamengine
	$(BIN)/streamengine contract --check

clean:
	rm -rf $(VENV) .streamengine
