"""What would more labelled photos buy? The fine-tunes' learning curve on the validation slice;
the test set is read only by `table`, after.

    .venv/bin/python tools/learning_curve_probe.py train --workdir DIR \
        --fractions 0.25 0.5 1 [--precision bfloat16] [--equal-steps] --out seed0.npz
    .venv/bin/python tools/learning_curve_probe.py table seed*.npz

`train`, in a workspace where `dvc repro activations train@tf train@keras` (or one seed of
tools/split_seeds.py) has run: for every fine-tuned model in the registry and every fraction,
a class-stratified fraction of the training images outside the validation slice (drawn once
with `heads.seed`, so each smaller set lies inside the larger ones) with all their cached
views. The model's head is refitted on that set first (`refit_head`: the head the train stage
saved has seen every training image), then the blocks are fine-tuned with the stage's recipe,
on the same validation slice, the epoch kept by the same rule. The stage's epochs are a number
of passes, so a smaller set gets fewer steps; `--equal-steps` runs epochs / fraction of them
instead (rounded), about the steps of the whole set. Records the refitted head's
validation accuracy (the frozen features' curve) and the fine-tuned model's probabilities on
the `orig` view of the validation and test images; writes nothing into DIR.

`table` pools the files (one per split seed): validation right per fraction, the gain per
doubling of the training images, then the test accuracy, read after. Files of one seed from
passes with different `--fractions` carry one name (`a/seed0.npz b/seed0.npz`) and are merged.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import probe_runs  # noqa: E402
from tools.probe_runs import fine_tuned_models, mean_sd, models_in, right  # noqa: E402


def nested_image_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-stratified `fraction` of the images whose labels are `labels`: in
    each class the first round(fraction × n) (at least one) of one permutation drawn from
    `seed`, so for one seed a smaller fraction's images are among a larger one's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a fraction of the training images must be in (0, 1], not {fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # one draw for every fraction: the sets nest
    kept = [
        in_class[: max(1, round(fraction * len(in_class)))]
        for in_class in (order[labels[order] == c] for c in np.unique(labels))
    ]
    return np.sort(np.concatenate(kept))


def subset_rows(data, fraction: float, seed: int):
    """`data` (a FinetuneData) with only the training rows of `nested_image_subset`'s images:
    every cached view of each, the validation slice unchanged."""
    from imgclf.finetune.common import keep_training_rows

    first_row = np.unique(data.train_images, return_index=True)[1]  # image i's first row
    images = nested_image_subset(data.y_train[first_row], fraction, seed)
    return keep_training_rows(data, np.isin(data.train_images, images))


def epochs_at(fraction: float, epochs: int, equal_steps: bool) -> int:
    """The epochs to train on `fraction` of the images: the stage's `epochs`, or with
    `equal_steps` as many as give about the whole set's steps (at least the stage's)."""
    return max(epochs, round(epochs / fraction)) if equal_steps else epochs


def train_curve(workdir: Path, fractions: list[float], precision: str | None,
                equal_steps: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its notices)
    from imgclf.registry import get_model, model_params

    ws = probe_runs.load_workspace(workdir)
    out = ws.labels()
    out["fractions"] = np.array(fractions, np.float64)
    subsets = [subset_rows(ws.data, f, ws.heads.seed) for f in fractions]
    out["n_train_images"] = np.array([s.n_train_images for s in subsets], np.int64)
    for name in fine_tuned_models():
        vals, tests, starts, epochs, runs = [], [], [], [], []
        stage_epochs = model_params(get_model(name), ws.params)["epochs"]
        for fraction, subset in zip(fractions, subsets, strict=True):
            started = time.perf_counter()
            runs.append(epochs_at(fraction, stage_epochs, equal_steps))
            val, test, result = probe_runs.train_and_score(
                ws, name, probe_runs.refitted_head(ws, name, subset), subset, seed=ws.heads.seed,
                precision=precision, changes={"epochs": runs[-1]},
            )  # fmt: skip
            vals.append(val)
            tests.append(test)
            starts.append(result.summary["start_val_accuracy"])
            epochs.append(result.summary["model_step"])
            print(f"{name}, {fraction:g} of the training images ({subset.n_train_images}): "
                  f"refitted head {starts[-1]:.4f}, fine-tuned {right(val, ws.data.y_val)} of "
                  f"{len(ws.data.y_val)} (epoch {epochs[-1]} of {runs[-1]}), "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
        out[f"{name}_val"], out[f"{name}_test"] = np.stack(vals), np.stack(tests)
        out[f"{name}_start_val"] = np.array(starts, np.float64)
        out[f"{name}_epoch"] = np.array(epochs, np.int64)
        out[f"{name}_epochs_run"] = np.array(runs, np.int64)
    return out


def merge_passes(files: list[Path]) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """`load_runs`, with the files of one split seed (one name, several folders: passes run
    with different `--fractions`) merged fraction by fraction, in ascending order."""
    by_seed: dict[str, list[Path]] = {}
    for path in files:
        by_seed.setdefault(path.stem, []).append(path)
    runs = {}
    for seed, paths in by_seed.items():
        passes = [dict(np.load(path)) for path in paths]
        first = passes[0]
        for path, other in zip(paths[1:], passes[1:], strict=True):
            if set(other) != set(first) or not all(
                np.array_equal(first[k], other[k]) for k in ("y_val", "y_test")
            ):
                raise SystemExit(
                    f"{path} and {paths[0]} share a name but not a split seed's images (or "
                    "arrays): merge only passes of one seed, one workspace and one probe version"
                )
        fractions = np.concatenate([p["fractions"] for p in passes])
        if len(np.unique(fractions)) < len(fractions):
            raise SystemExit(
                f"{', '.join(map(str, paths))}: fractions {sorted(fractions.tolist())}; "
                "give each fraction of a seed in one file only"
            )
        order = np.argsort(fractions)
        runs[seed] = {
            key: first[key]
            if key in ("y_val", "y_test")
            else np.concatenate([p[key] for p in passes])[order]
            for key in first
        }
    return runs, sum(len(r["y_val"]) for r in runs.values())


def table(files: list[Path]) -> str:
    """Validation first, with the gain per doubling of the training images; then test."""
    runs, n_val = merge_passes(files)
    models = models_in(runs)
    fractions = next(iter(runs.values()))["fractions"]
    if any(not np.array_equal(r["fractions"], fractions) for r in runs.values()):
        raise SystemExit("the files were trained with different --fractions")
    images = [round(np.mean([r["n_train_images"][i] for r in runs.values()]))
              for i in range(len(fractions))]  # fmt: skip
    cells = " | ".join(f"{m}: refitted head / fine-tuned, right of {n_val}; per seed"
                       for m in models)  # fmt: skip
    lines = [f"| training images (fraction), mean a seed | {cells} |",
             "|---|" + "---|" * len(models)]  # fmt: skip
    pooled: dict[str, list[int]] = {m: [] for m in models}
    for i, fraction in enumerate(fractions):
        row = []
        for m in models:
            per_seed = [right(r[f"{m}_val"][i], r["y_val"]) for r in runs.values()]
            head = sum(round(r[f"{m}_start_val"][i] * len(r["y_val"])) for r in runs.values())
            pooled[m].append(sum(per_seed))
            row.append(f"{head} / {sum(per_seed)} ({sum(per_seed) / n_val:.4f}); "
                       + "/".join(map(str, per_seed)))  # fmt: skip
        lines.append(f"| {images[i]} ({fraction:g}) | {' | '.join(row)} |")
    lines.append("")
    for m in models:  # files written before --equal-steps existed lack the epochs run
        if all(f"{m}_epochs_run" in r for r in runs.values()):
            kept = "; ".join(
                f"{f:g}: " + ", ".join(f"{r[f'{m}_epoch'][i]} of {r[f'{m}_epochs_run'][i]}"
                                       for r in runs.values())
                for i, f in enumerate(fractions)
            )  # fmt: skip
            lines += [f"{m}, the epoch kept of the epochs run, per seed: {kept}", ""]
    for m in models:  # validation points gained per doubling, between neighbouring fractions
        steps = []
        for i in range(len(fractions) - 1):
            doublings = math.log2(fractions[i + 1] / fractions[i])
            points = (pooled[m][i + 1] - pooled[m][i]) / n_val * 100
            steps.append(f"{fractions[i]:g} → {fractions[i + 1]:g}: {points / doublings:+.2f}")
        lines.append(f"{m}, fine-tuned: validation points per doubling, " + "; ".join(steps))
    lines += ["", f"Split seeds (files): {', '.join(runs)}.", "", "Test, read after:", "",
              "| fraction | " + " | ".join(f"{m}: test accuracy, mean ± sd; per seed"
                                         for m in models) + " |",
              "|---|" + "---|" * len(models)]  # fmt: skip
    for i, fraction in enumerate(fractions):
        row = [mean_sd([right(r[f"{m}_test"][i], r["y_test"]) / len(r["y_test"])
                        for r in runs.values()]) for m in models]  # fmt: skip
        lines.append(f"| {fraction:g} | {' | '.join(row)} |")
    return "\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                        help="of the training images, ascending")  # fmt: skip
    parser.add_argument("--precision", help="of the fine-tuned blocks (default: the stage's)")
    parser.add_argument(
        "--equal-steps",
        action="store_true",
        help="train fraction f for epochs / f epochs (the whole set's steps)",
    )


if __name__ == "__main__":
    probe_runs.cli(
        __doc__,
        add_options,
        lambda a: train_curve(a.workdir, sorted(a.fractions), a.precision, a.equal_steps),
        table,
    )
