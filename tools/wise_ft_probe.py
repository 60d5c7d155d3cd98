"""Would interpolating a fine-tune with its start reach the target? WiSE-FT (Wortsman et al.,
"Robust fine-tuning of zero-shot models", 2022): the weights (1 - a) * start + a * fine-tuned,
for a on a grid, judged on the validation slice; the test set is read only by `table`, after.

    .venv/bin/python tools/wise_ft_probe.py train --workdir DIR --out seed0.npz
    .venv/bin/python tools/wise_ft_probe.py table seed*.npz

`train`, in a workspace where `dvc repro activations train@tf train@keras` (or one seed of
tools/split_seeds.py) has run: each fine-tuned model is trained as its stage trains it (same
rows, validation slice, seed and kept epoch), and its start is what the stage starts from (the
trained head on the pretrained blocks: the frozen model). Both have the same variables, so
every point between them is a model of the same shape and cost. For each a it scores the
`orig` view of the validation and test images with the interpolated weights, and with the
start's and the fine-tune's probabilities mixed in the same proportion (the output-space
variant). a = 1 is the stage's model, a = 0 the frozen one. Writes the probabilities to --out;
writes nothing into DIR.

`table` pools the files (one per split seed): validation right per a, both variants; then
test at a = 1 and at the a with the most pooled validation right (the largest on a tie).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import probe_runs  # noqa: E402
from tools.probe_runs import (  # noqa: E402
    fine_tuned_models,
    load_runs,
    mcnemar_cell,
    mean_sd,
    models_in,
    right,
    train_like_stage,
    trained_head,
)

ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
VARIANTS = {"weights": "w", "outputs": "o"}  # the arrays' infix


def model_weights(model: Any) -> list[Any]:
    """The variables interpolated: a FinetuneTop's explicit list, or a Keras model's weights
    (its frozen ones are equal in both ends, so interpolating them changes nothing)."""
    if hasattr(model, "variables_to_train"):
        return [v for _, v in model.variables_to_train()]
    return list(model.weights)


def model_predict(model: Any) -> Any:
    if hasattr(model, "variables_to_train"):
        return lambda x: model.predict(x).numpy()
    # One batch at a time: ws.scores batches already, and model.predict's tf.data pipeline
    # logs a C++ error line per call here.
    return lambda x: np.asarray(model.predict_on_batch(x))


def start_weights(
    ws: probe_runs.Workspace, name: str, precision: str, like: Any
) -> list[np.ndarray]:
    """The weights the stage starts fine-tuning from, built as the trainer of `like` (its
    fine-tuned model) builds them."""
    from imgclf.finetune.finetune_keras import build_finetune_model
    from imgclf.finetune.finetune_tf import FinetuneTop

    top = probe_runs.frozen_top(ws, precision)
    head = trained_head(ws, name)(top)
    if isinstance(like, FinetuneTop):
        start = FinetuneTop(top, head, ws.params["activations"]["cut"])
    else:
        start = build_finetune_model(top, head)
    return [np.array(v.numpy()) for v in model_weights(start)]


def train_and_interpolate(workdir: Path) -> dict[str, np.ndarray]:
    import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its notices)
    from imgclf.finetune.common import split_recipe
    from imgclf.registry import get_model, model_params

    ws = probe_runs.load_workspace(workdir)
    out = {**ws.labels(), "alphas": np.array(ALPHAS)}
    for name in fine_tuned_models():
        _, settings = split_recipe(model_params(get_model(name), ws.params))
        if settings.refit_head:
            raise SystemExit(f"{name}.refit_head: the probe starts from the trained head only")
        started = time.perf_counter()
        result = train_like_stage(ws, name, trained_head(ws, name), ws.data, seed=ws.heads.seed)
        tuned = model_weights(result.model)
        end = [np.array(v.numpy()) for v in tuned]
        start = start_weights(ws, name, settings.precision, like=result.model)
        if [a.shape for a in start] != [b.shape for b in end]:
            raise SystemExit(f"{name}: the start's weights do not match the fine-tune's")
        vals, tests = [], []
        for alpha in ALPHAS:
            for var, s, e in zip(tuned, start, end, strict=True):
                var.assign((1.0 - alpha) * s + alpha * e)
            val, test = ws.scores(model_predict(result.model))
            vals.append(val)
            tests.append(test)
            print(f"{name} a = {alpha}: validation {right(val, ws.data.y_val)} of "
                  f"{len(ws.data.y_val)}", flush=True)  # fmt: skip
        wval, wtest = np.stack(vals), np.stack(tests)
        a = np.array(ALPHAS)[:, None, None]
        out[f"{name}_val"], out[f"{name}_test"] = wval[-1], wtest[-1]  # the stage's model
        out[f"{name}_wval"], out[f"{name}_wtest"] = wval, wtest
        out[f"{name}_oval"] = (1 - a) * wval[0] + a * wval[-1]
        out[f"{name}_otest"] = (1 - a) * wtest[0] + a * wtest[-1]
        out[f"{name}_kept_epoch"] = np.array(result.summary["model_step"])
        print(f"{name}: kept epoch {result.summary['model_step']}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    return out


def chosen(runs: dict[str, dict[str, np.ndarray]], key: str) -> int:
    """The index of the a with the most validation right, pooled; the largest a on a tie."""
    alphas = next(iter(runs.values()))["alphas"]
    totals = [sum(right(r[key][i], r["y_val"]) for r in runs.values()) for i in range(len(alphas))]
    return max(range(len(alphas)), key=lambda i: (totals[i], alphas[i]))


def table(files: list[Path]) -> str:
    """Validation first (what the rule reads), then test, read after."""
    runs, n_val = load_runs(files)
    models = models_in(runs)
    alphas = next(iter(runs.values()))["alphas"]
    columns = [(name, variant) for name in models for variant in VARIANTS]
    head = " | ".join(f"{n}, {v}: validation, right of {n_val}; per seed" for n, v in columns)
    lines = [f"| a | {head} |", "|---|" + "---|" * len(columns)]
    for i, alpha in enumerate(alphas):
        cells = []
        for name, variant in columns:
            per_seed = [right(r[f"{name}_{VARIANTS[variant]}val"][i], r["y_val"])
                        for r in runs.values()]  # fmt: skip
            cells.append(f"{sum(per_seed)} ({sum(per_seed) / n_val:.4f}); "
                         + "/".join(map(str, per_seed)))  # fmt: skip
        lines.append(f"| {alpha:g} | {' | '.join(cells)} |")
    lines += [
        "",
        f"Split seeds (files): {', '.join(runs)}. a = 1: the stage's model; a = 0: "
        "its start (the frozen blocks and the trained head).",
        "",
        "Test, read after:",
        "",
    ]
    lines += ["| model, variant | a chosen on validation | test at a = 1, mean ± sd; per seed "
              "| test at the chosen a | chosen vs a = 1 (right only by the chosen / by a = 1, "
              "exact McNemar) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, variant in columns:
        key = f"{name}_{VARIANTS[variant]}"
        i = chosen(runs, f"{key}val")
        at_one = [right(r[f"{key}test"][-1], r["y_test"]) / len(r["y_test"]) for r in runs.values()]
        at_i = [right(r[f"{key}test"][i], r["y_test"]) / len(r["y_test"]) for r in runs.values()]
        mcnemar = "; ".join(mcnemar_cell(seed, r[f"{key}test"][i], r[f"{key}test"][-1], r["y_test"])
                            for seed, r in runs.items())  # fmt: skip
        lines.append(f"| {name}, {variant} | {alphas[i]:g} | {mean_sd(at_one)} | {mean_sd(at_i)} "
                     f"| {mcnemar} |")  # fmt: skip
    return "\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    del parser  # the probe has no options beyond the workspace and --out


if __name__ == "__main__":
    probe_runs.cli(__doc__, add_options, lambda a: train_and_interpolate(a.workdir), table)
