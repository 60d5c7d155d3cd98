"""Would test-time augmentation over the cached views reach the target? The stages' fine-tuned
models scored on every cached training view of the validation images, and the views' averages
judged on the validation slice. The test set is not read: a screen decides first.

    .venv/bin/python tools/tta_probe.py train --workdir DIR --out seed0.npz
    .venv/bin/python tools/tta_probe.py table seed*.npz

`train` (it trains nothing: the name is the probes' shared command line), in a workspace where
`dvc repro evaluate` (or one seed of tools/split_seeds.py) has run: each fine-tuned model its
stage saved, on each view of activations.train_views of the validation images (never trained
on: the stages train on no view of them). Writes `<model>_val` [views, images, classes], the
view names and `y_val` to --out; writes nothing into DIR.

`table` pools the files (one per split seed): validation right, per set of views averaged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import probe_runs  # noqa: E402
from tools.probe_runs import fine_tuned_models, load_runs, right  # noqa: E402

# The sets the table averages over, by a predicate on the view names (cached views only).
VIEW_SETS = {
    "orig (the stages')": lambda v: v == "orig",
    "orig + flip": lambda v: v in ("orig", "flip"),
    "orig + the corner crops, no flips": lambda v: not v.endswith("flip"),
    "the corner crops and their flips": lambda v: v.startswith("crop"),
    "every cached view": lambda v: True,
}


def score_views(workdir: Path, batch_size: int = 64) -> dict[str, np.ndarray]:
    from imgclf.registry import get_model

    ws = probe_runs.load_workspace(workdir, with_test=False)
    acts, data = ws.acts, ws.data
    views = list(acts.views)
    images = acts.ids[data.val_rows]
    out: dict[str, np.ndarray] = {"y_val": data.y_val, "views": np.array(views)}
    for name in fine_tuned_models():
        predict = get_model(name).function("predictor")(ws.layout.model_dir(name))
        per_view = []
        for view in views:
            rows = acts.of_view(view)
            position = {image: i for i, image in enumerate(acts.ids[rows])}
            rows = rows[[position[image] for image in images]]
            per_view.append(np.concatenate([
                predict(np.asarray(acts.x[rows[i : i + batch_size]], np.float32))
                for i in range(0, len(rows), batch_size)
            ]))  # fmt: skip
            print(f"{name}, {view}: validation {right(per_view[-1], data.y_val)} of "
                  f"{len(data.y_val)}", flush=True)  # fmt: skip
        out[f"{name}_val"] = np.stack(per_view)
    return out


def table(files: list[Path]) -> str:
    runs, n_val = load_runs(files)
    models = [m for m in fine_tuned_models() if all(f"{m}_val" in r for r in runs.values())]
    head = " | ".join(f"{n}: validation, right of {n_val}; per seed" for n in models)
    lines = [f"| views averaged | {head} |", "|---|" + "---|" * len(models)]
    for label, chosen in VIEW_SETS.items():
        cells = []
        for name in models:
            per_seed = []
            for r in runs.values():
                keep = [i for i, v in enumerate(r["views"]) if chosen(str(v))]
                per_seed.append(right(r[f"{name}_val"][keep].mean(0), r["y_val"]) if keep else 0)
            cells.append(f"{sum(per_seed)} ({sum(per_seed) / n_val:.4f}); "
                         + "/".join(map(str, per_seed)))  # fmt: skip
        lines.append(f"| {label} | {' | '.join(cells)} |")
    views = sorted({str(v) for r in runs.values() for v in r["views"]})
    lines += ["", f"Split seeds (files): {', '.join(runs)}. Cached views: {', '.join(views)}."]
    return "\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)


if __name__ == "__main__":
    probe_runs.cli(__doc__, add_options, lambda a: score_views(a.workdir, a.batch_size), table)
