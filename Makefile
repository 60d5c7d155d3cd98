# Two entry points: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Point the pipeline at a local copy of the data: make run DATA=../shared/datasets/flower_photos
DATA   ?=
# Stage commands run `python`, `dvc` and `mlflow`: those of the venv, as if it were activated.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test lint bench ui setup clean

$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
ifeq ($(strip $(DATA)),)
	$(BIN)/dvc repro
else
	$(BIN)/dvc exp run -S 'data.source=$(DATA)'
endif

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/bottlenecks.py

# MLflow 3 opens an experiment in its GenAI view; the printed link opens the runs, model-training view.
UI_PORT ?= 5000
ui: setup
	@echo "MLflow UI: open $$($(BIN)/python -m imgclf.tracking ui-url http://127.0.0.1:$(UI_PORT))"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts \
		--host 127.0.0.1 --port $(UI_PORT)

clean:
	rm -rf data/images data/split data/bottlenecks models
