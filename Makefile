# `make run` and `make test` set everything up on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QUILL := $(VENV)/bin/quill
# A bundled model name or a model directory; empty: the bundled Shakespeare model.
MODEL ?=
MODEL_ARG := $(if $(MODEL),--model $(MODEL))
PORT ?= 8501
# Local copies of the registered datasets (no internet needed); CI has them beside the checkout.
DATA_DIR ?= $(abspath ../shared/data)
export QUILL_DATA_DIR ?= $(DATA_DIR)

.PHONY: run generate test venv lint bench serve playground figures clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[serve,ui,dev,interop]'
	touch $@

run: venv
	$(QUILL) playground $(MODEL_ARG) --port $(PORT)

playground: run

serve: venv
	$(QUILL) serve $(MODEL_ARG)

figures: venv
	$(PY) scripts/make_figures.py $(MODEL_ARG) --out docs/figures

generate: venv
	$(QUILL) generate $(MODEL_ARG) --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8

test: venv
	OMP_NUM_THREADS=1 QUILL_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check quillgpt tests benchmarks scripts notebooks
	$(VENV)/bin/ruff format --check quillgpt tests benchmarks scripts notebooks
	$(VENV)/bin/lint-imports

bench: venv
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) .pytest_cache
