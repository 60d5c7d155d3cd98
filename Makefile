# Entry points: `make run` and `make test`; `make exp`, `make seeds` and `make plots` for the
# README's experiments. Every target creates .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Point the pipeline at a local copy of the data: make run DATA=../shared/datasets/flower_photos
DATA   ?=
# Params for one experiment, as `dvc exp run -S` takes them: make exp SET='train_tf.steps=2000'
SET    ?=
# Extra `dvc exp run` options, e.g. EXP_ARGS='--temp' or EXP_ARGS='-n my-try'
EXP_ARGS ?=
SEEDS  ?= 0 1 2 3 4
# Stage commands run `python`, `dvc` and `mlflow`: those of the venv, as if it were activated.
export PATH := $(abspath $(BIN)):$(PATH)

# `dvc exp run` commits each experiment (to refs/exps/, never to a branch) and refuses to without
# a git identity. A machine that has none (a CI runner, a container) gets git's own fallback,
# user@host, for make's commands only; a configured identity or GIT_* variables win, and
# nothing is written to any git config.
ifeq ($(shell git config user.name),)
GIT_FALLBACK_NAME := $(shell id -un 2>/dev/null || echo imgclf)
export GIT_AUTHOR_NAME ?= $(GIT_FALLBACK_NAME)
export GIT_COMMITTER_NAME ?= $(GIT_FALLBACK_NAME)
endif
ifeq ($(shell git config user.email),)
GIT_FALLBACK_EMAIL := $(shell id -un 2>/dev/null || echo imgclf)@$(shell uname -n)
export GIT_AUTHOR_EMAIL ?= $(GIT_FALLBACK_EMAIL)
export GIT_COMMITTER_EMAIL ?= $(GIT_FALLBACK_EMAIL)
endif

.PHONY: help run exp seeds plots test lint bench bench-ray bench-litert ui serve tensorboard setup clean

# Plain `make` lists the targets: their `##` comments, printed by the rule below.
.DEFAULT_GOAL := help
help: ## this list
	@sed -n 's/^\([a-z-]*\):.*## \(.*\)/  make \1\t\2/p' $(MAKEFILE_LIST) | expand -t 24

$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,openvino]"
	touch $(BIN)/activate

# Ray, the optional extra `.[ray]` of the `ray` executor (README, "Feature extraction on Ray"):
# ray[data] 2.x, a 79 MB wheel, +434 MiB in the venv, ~10 s to install from PyPI here. `make
# test` always installs it, so that tests/test_ray_executor.py runs (in CI too) instead of
# skipping; `make run`/`exp` install it only when params.yaml or SET asks for executor: ray.
RAY_STAMP := $(VENV)/.ray-extra
$(RAY_STAMP): pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	touch $@
WANTS_RAY := $(shell grep -Eq '^ +executor: *ray' params.yaml && echo yes)$(findstring executor=ray,$(SET) $(DATA))
RAY_IF_WANTED := $(if $(strip $(WANTS_RAY)),$(RAY_STAMP))

# Built once; without the npm registry it is skipped (DVC's CDN page remains) and retried later.
PLOTS_PAGE := .dvc/plots/offline.html
$(PLOTS_PAGE): | $(BIN)/activate
	-$(BIN)/python -m imgclf.offline_plots

setup: $(BIN)/activate $(PLOTS_PAGE) ## create .venv and install the project (every target does it first)

# Where a run's results are, said after it; not after --temp or --queue, which leave the
# workspace's results as they were.
WHERE_RESULTS = $(if $(filter --temp --queue,$(EXP_ARGS)),,@echo "results: metrics/comparison.md; \
	see them with make plots, make ui or make tensorboard (make alone lists every target)")

# DATA reaches DVC as a literal string (imgclf/overrides.py): a folder named `flowers (copy)`
# or `nathan's photos` is neither a shell nor an override syntax error.
run: export IMGCLF_VALUE = $(DATA)
run: setup $(RAY_IF_WANTED) ## run the whole pipeline (DATA=<folder, archive, export or URL> sets data.source)
ifeq ($(strip $(DATA)),)
	$(BIN)/dvc repro
else
	$(BIN)/dvc exp run $(EXP_ARGS) -S "$$($(BIN)/python -m imgclf.overrides data.source)"
endif
	$(WHERE_RESULTS)

exp: setup $(RAY_IF_WANTED) ## one DVC experiment: SET='train_tf.steps=2000 ...' (EXP_ARGS='--temp')
	$(BIN)/dvc exp run $(EXP_ARGS) $(foreach s,$(SET),-S '$(s)')
	$(WHERE_RESULTS)

seeds: setup ## the five-seed tables: SEEDS='0 1 2 3 4' (SET= as for exp)
	$(BIN)/python tools/split_seeds.py --seeds $(SEEDS) $(foreach s,$(SET),-S '$(s)')

# `dvc plots show` with vega, vega-lite and vega-embed inlined (pinned, checked): the HTML then
# renders without internet. The same template serves plain `dvc plots show/diff` afterwards.
plots: setup ## dvc plots show, offline: curves, confusion matrices, contact sheets
	$(BIN)/python -m imgclf.offline_plots
	$(BIN)/dvc plots show

# Two worker processes, one test file each at a time (--dist loadfile keeps a module's fixtures,
# such as test_pipeline's project, in one process): the suite waits on single-threaded work
# (Python and TensorFlow start-up, DVC, git) as much as on the model, so a second process
# fills the gaps of the first. --no-loadscope-reorder: files start in tests/conftest.py's order
# (the longest first), not in pytest-xdist's default (most tests first), which leaves the
# whole-pipeline file (few tests, minutes long) to the end. TEST_ARGS='-n 0' runs it serially.
TEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=15
test: setup $(RAY_STAMP) ## ruff, then the test suite (10 to 16 minutes on two cores, by CPU)
	$(BIN)/ruff check .
	$(BIN)/pytest $(TEST_ARGS)

lint: setup ## ruff check and ruff format --check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup ## the bottleneck and runtime benchmarks (tables of ratios)
	$(BIN)/python bench/bottlenecks.py
	$(BIN)/python bench/runtimes.py

bench-ray: setup $(RAY_STAMP) ## the Ray executor benchmark
	$(BIN)/python bench/ray_executor.py

# The LiteRT files of one trained model against TF (README, "Phones: LiteRT export"): needs the
# model's stage run here first (dvc repro train@tf). make bench-litert LITERT_ARGS='--model keras'
LITERT_ARGS ?=
bench-litert: setup ## the LiteRT files of a trained model against TF
	$(BIN)/python bench/litert.py $(LITERT_ARGS)

# MLflow 3 opens an experiment in its GenAI view; the printed link opens the runs, model-training
# view. The UI shows the store track logs to: mlflow.db, or the database MLFLOW_TRACKING_URI
# names; a tracking server has a UI of its own, so for one only its link is printed.
UI_PORT ?= 5000
ui: setup ## the MLflow UI on the pipeline's runs (UI_PORT=5000)
	@$(BIN)/python -m imgclf.tracking.servers ui --port $(UI_PORT)

# A registered end-to-end model over HTTP (README, "MLflow"): make serve MODEL=models:/<name>@champion.
# `mlflow models serve` starts uvicorn by name, so the venv must be on PATH (make's PATH has it;
# a bare .venv/bin/mlflow in a shell where nothing is activated fails: "uvicorn: not found").
# The default MODEL is the @champion of this data set's finetune_keras (its registered name
# follows data.source: flower_photos-finetune_keras for the flowers); a models:/ URI that names
# nothing stops here with what is registered, before MLflow starts a server.
MODEL ?=
SERVE_PORT ?= 5001
serve: setup ## a registered end-to-end model over HTTP (MODEL=models:/<name>@champion)
	@uri="$$($(BIN)/python -m imgclf.tracking.servers serve-uri '$(MODEL)' --port $(SERVE_PORT))" && \
	echo "serving $$uri" && \
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" $(BIN)/mlflow models serve \
		-m "$$uri" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

# The fine-tune stages' event files: curves on the epoch axis, weight and gradient histograms,
# gradient norms per block (paths.tensorboard in params.yaml).
TB_PORT ?= 6006
tensorboard: setup ## the fine-tunes' TensorBoard events (TB_PORT=6006)
	$(BIN)/tensorboard --logdir logs/tensorboard --host 127.0.0.1 --port $(TB_PORT)

# What git ignores under data/, models/ and logs/ is what the stages wrote; the tracked files
# there (the .gitignore files, models/litert/README.md that track reads) stay. The feature
# caches in ~/.cache/imgclf, DVC's cache and metrics/ stay too: `dvc checkout` restores.
clean: ## delete the stages' data, models and TensorBoard events (git-ignored files only)
	git clean -fdX -- data models logs
