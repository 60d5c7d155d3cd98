"""Would averaging the fine-tune's weights over its last epochs reach the target? Stochastic
weight averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", 2018): with the recipes' constant learning rate, the trained variables of
epochs a..b averaged, in place of the best epoch on validation.

    .venv/bin/python tools/swa_probe.py train --workdir DIR --out seed0.npz [--score-test]
        [--epochs N]
    .venv/bin/python tools/swa_probe.py table seed*.npz

`train`, in a workspace where `dvc repro evaluate` (or one seed of tools/split_seeds.py) has
run: each fine-tuned model trained as its stage trains it (same rows, validation slice, seed
and precision), with a copy of its trained variables taken at the end of every epoch. Batch
norm is frozen in inference mode in both fine-tunes, so an average needs no statistics pass.
Scores the `orig` view of the validation images with the stage's kept epoch and with each
window of LAST_EPOCHS averaged; the test images only with --score-test (a screen leaves them
unread). Writes the probabilities to --out; writes nothing into DIR.

`table` pools the files (one per split seed): validation right per window; test, when scored.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager
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
from tools.wise_ft_probe import model_predict  # noqa: E402

# The windows averaged: the last k epochs of those run (all of them for None); the first is
# the screen's (epochs 5-9 of the recipes' 9).
LAST_EPOCHS = (5, 7, 3, None)


def windows(epochs: int) -> list[tuple[int, int]]:
    """(first, last) epoch of each LAST_EPOCHS window, 1-based and inclusive."""
    return [(max(1, epochs - (k or epochs) + 1), epochs) for k in LAST_EPOCHS]


def trained_variables(model: Any) -> list[Any]:
    """The variables the trainer trains and logs: a FinetuneTop's explicit list, or a Keras
    model's trainable weights (batch norm's are frozen, so neither holds them)."""
    if hasattr(model, "variables_to_train"):
        return [v for _, v in model.variables_to_train()]
    return list(model.trainable_weights)


@contextmanager
def epoch_snapshots() -> Any:
    """A copy of the trained variables at the end of every epoch, in the order the trainer
    logs them. Both trainers hand their trained variables to `TensorBoardLog.histograms` once
    an epoch, under `weights/` so the probe reads
    them there rather than adding a hook to the stages' code (`trained_variables`' order)."""
    from imgclf.finetune.common import TensorBoardLog

    snapshots: list[list[np.ndarray]] = []
    original = TensorBoardLog.histograms

    def histograms(self: Any, epoch: int, values: Iterable[tuple[str, Any]]) -> None:
        values = list(values)
        if values and values[0][0].startswith("weights/"):
            snapshots.append([np.array(v.numpy()) for _, v in values])
        original(self, epoch, values)

    TensorBoardLog.histograms = histograms
    try:
        yield snapshots
    finally:
        TensorBoardLog.histograms = original


def score(
    ws: probe_runs.Workspace, name: str, model: Any, label: str, score_test: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's probabilities on the `orig` view of the validation images, and of the test
    images when `score_test`."""
    predict = model_predict(model)
    val, test = ws.scores(predict) if score_test else (ws.val_scores(predict), None)
    print(f"{name}, {label}: validation {right(val, ws.data.y_val)} of {len(ws.data.y_val)}",
          flush=True)  # fmt: skip
    return val, test


def train_and_average(
    workdir: Path, score_test: bool, epochs: int | None = None
) -> dict[str, np.ndarray]:
    import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its notices)

    ws = probe_runs.load_workspace(workdir, with_test=score_test)
    out: dict[str, np.ndarray] = {"y_val": ws.data.y_val}
    if score_test:
        out["y_test"] = ws.labels()["y_test"]
    for name in fine_tuned_models():
        started = time.perf_counter()
        with epoch_snapshots() as snapshots:
            result = train_like_stage(ws, name, trained_head(ws, name), ws.data,
                                      seed=ws.heads.seed,
                                      changes={"epochs": epochs} if epochs else None)  # fmt: skip
        variables = trained_variables(result.model)
        if len(snapshots) != result.summary["epochs"] or any(
            [s.shape for s in snap] != [tuple(v.shape) for v in variables] for snap in snapshots
        ):
            raise SystemExit(f"{name}: {len(snapshots)} epoch snapshots that do not match its "
                             f"{result.summary['epochs']} epochs of {len(variables)} trained "
                             "variables")  # fmt: skip
        spans = windows(len(snapshots))

        scored = [score(ws, name, result.model, f"kept epoch {result.summary['model_step']}",
                        score_test)]  # fmt: skip
        for first, last in spans:
            for i, var in enumerate(variables):
                var.assign(np.mean([snap[i] for snap in snapshots[first - 1 : last]], axis=0))
            scored.append(score(ws, name, result.model, f"epochs {first}-{last} averaged",
                                score_test))  # fmt: skip
        out[f"{name}_val"] = np.stack([v for v, _ in scored])  # [kept, *spans]
        out[f"{name}_windows"] = np.array(spans)
        if score_test:
            out[f"{name}_test"] = np.stack([t for _, t in scored])
        out[f"{name}_kept_epoch"] = np.array(result.summary["model_step"])
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def table(files: list[Path]) -> str:
    """Validation first (what the rule reads), then test when every file holds it."""
    runs, n_val = load_runs(files)
    models = models_in(runs)
    seen = {tuple(map(tuple, r[f"{n}_windows"])) for r in runs.values() for n in models}
    if len(seen) != 1:
        raise SystemExit(f"the files' models ran different epochs: windows {sorted(seen)}")
    (spans,) = seen
    first = spans[0]  # the screen's window
    labels = ["the stage's kept epoch"] + [f"epochs {a}-{b} averaged" for a, b in spans]
    head = " | ".join(f"{n}: validation, right of {n_val}; per seed" for n in models)
    lines = [f"| weights | {head} |", "|---|" + "---|" * len(models)]
    for i, label in enumerate(labels):
        cells = []
        for name in models:
            per_seed = [right(r[f"{name}_val"][i], r["y_val"]) for r in runs.values()]
            cells.append(f"{sum(per_seed)} ({sum(per_seed) / n_val:.4f}); "
                         + "/".join(map(str, per_seed)))  # fmt: skip
        lines.append(f"| {label} | {' | '.join(cells)} |")
    kept = "; ".join(f"{n} " + "/".join(str(int(r[f"{n}_kept_epoch"])) for r in runs.values())
                     for n in models)  # fmt: skip
    lines += ["", f"Split seeds (files): {', '.join(runs)}. Kept epochs: {kept}."]
    if not all("y_test" in r for r in runs.values()):
        return "\n".join([*lines, "", "Test not scored (train without --score-test)."])
    lines += ["", "Test, read after (the first window against the kept epoch):", "",
              f"| model | kept epoch, mean ± sd; per seed | epochs {first[0]}-{first[1]} "
              "averaged | averaged vs kept (right only by "
              "each, exact McNemar) |", "|---|---|---|---|"]  # fmt: skip
    for name in models:
        acc = [[right(r[f"{name}_test"][i], r["y_test"]) / len(r["y_test"])
                for r in runs.values()] for i in (0, 1)]  # fmt: skip
        mcnemar = "; ".join(mcnemar_cell(seed, r[f"{name}_test"][1], r[f"{name}_test"][0],
                                         r["y_test"]) for seed, r in runs.items())  # fmt: skip
        lines.append(f"| {name} | {mean_sd(acc[0])} | {mean_sd(acc[1])} | {mcnemar} |")
    return "\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--score-test", action="store_true",
                        help="also score the test images (not for a screen)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None,
                        help="train this many epochs (default: the recipes')")  # fmt: skip


if __name__ == "__main__":
    probe_runs.cli(__doc__, add_options,
                   lambda a: train_and_average(a.workdir, a.score_test, a.epochs),
                   table)  # fmt: skip
