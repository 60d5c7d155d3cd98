"""Would an ensemble of fine-tunes reach the target? Several members per framework, judged on
the validation slice; the test set is read only by `table`, after.

    .venv/bin/python tools/ensemble_probe.py train --workdir DIR --members 3 --out seed0.npz
    .venv/bin/python tools/ensemble_probe.py table seed*.npz

`train`, in a workspace where `dvc repro evaluate` (or one seed of tools/split_seeds.py) has
run: member 0 of each fine-tune model is the model its stage saved; members 1, 2, ... are the
same recipe from the same start (the trained head, the blocks' pretrained weights) and differ
only in the seed of the training order (`heads.seed + i`: the batches and the probe rows).
Each is trained as the stage trains (same rows, same validation slice, its epoch kept by the
same rule) and scored on the `orig` view of the validation and test images. Writes their
probabilities to --out; writes nothing into DIR.

`table` pools the files (one per split seed): the validation accuracy of the average of the
first k members' probabilities for every k, in evaluations right, then the test scores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
    train_and_score,
    trained_head,
)


def train_members(workdir: Path, members: int, precision: str | None) -> dict[str, np.ndarray]:
    import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its notices)
    from imgclf.fileio import read_json
    from imgclf.finetune.common import split_recipe
    from imgclf.registry import get_model, model_params

    ws = probe_runs.load_workspace(workdir)
    layout, heads, data = ws.layout, ws.heads, ws.data
    out = ws.labels()
    for name in fine_tuned_models():
        spec = get_model(name)
        assert spec.base is not None
        _, settings = split_recipe(model_params(spec, ws.params))
        if settings.refit_head:
            raise SystemExit(f"{name}.refit_head: the probe starts from the trained head only")
        val, tst = ws.scores(spec.function("predictor")(layout.model_dir(name)))
        # What the stage ran with (params.yaml may have been put back since: split_seeds -S).
        ran = read_json(layout.train_metrics(name)).get("precision", settings.precision)
        print(f"{name} member 0 (the stage's model, {ran}): validation "
              f"{np.mean(val.argmax(1) == data.y_val):.4f}", flush=True)  # fmt: skip
        vals, tests = [val], [tst]
        start = trained_head(ws, name)
        for member in range(1, members):
            started = time.perf_counter()
            val, tst, result = train_and_score(ws, name, start, data, seed=heads.seed + member,
                                               precision=precision)  # fmt: skip
            vals.append(val)
            tests.append(tst)
            print(f"{name} member {member}: validation {np.mean(val.argmax(1) == data.y_val):.4f}"
                  f" (epoch {result.summary['model_step']}), ensemble of {member + 1}: "
                  f"{np.mean(np.mean(vals, 0).argmax(1) == data.y_val):.4f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
        out[f"{name}_val"], out[f"{name}_test"] = np.stack(vals), np.stack(tests)
    return out


def table(files: list[Path]) -> str:
    """Validation first (what the rule reads), then test, read after."""
    runs, n_val = load_runs(files)
    models = models_in(runs)
    members = min(r[f"{name}_val"].shape[0] for r in runs.values() for name in models)
    val_head = " | ".join(f"{n}: validation, right of {n_val}; per seed" for n in models)
    test_head = " | ".join(f"{n}: test accuracy, mean ± sd; per seed" for n in models)
    rule = "|---|" + "---|" * len(models)
    val_lines = [f"| members averaged | {val_head} |", rule]
    test_lines = [f"| members averaged | {test_head} |", rule]
    for k in range(1, members + 1):
        val_cells, test_cells = [], []
        for name in models:
            right_per_seed = [
                right(r[f"{name}_val"][:k].mean(0), r["y_val"]) for r in runs.values()
            ]
            total = sum(right_per_seed)
            val_cells.append(
                f"{total} ({total / n_val:.4f}); " + "/".join(map(str, right_per_seed))
            )
            acc = [right(r[f"{name}_test"][:k].mean(0), r["y_test"]) / len(r["y_test"])
                   for r in runs.values()]  # fmt: skip
            test_cells.append(mean_sd(acc))
        val_lines.append(f"| {k} | {' | '.join(val_cells)} |")
        test_lines.append(f"| {k} | {' | '.join(test_cells)} |")
    across = sum(right(np.mean([r[f"{name}_val"][0] for name in models], 0), r["y_val"])
                 for r in runs.values())  # fmt: skip
    lines = [*val_lines, "",
             f"Split seeds (files): {', '.join(runs)}. Member 0 of {' and of '.join(models)} "
             f"averaged (a model of no one framework): {across} of {n_val} on validation.", "",
             "Test, read after:", "", *test_lines, ""]  # fmt: skip
    for name in models:  # all members against member 0, per seed
        cells = [mcnemar_cell(seed, r[f"{name}_test"].mean(0), r[f"{name}_test"][0], r["y_test"])
                 for seed, r in runs.items()]  # fmt: skip
        lines.append(
            f"{name}, {members} members vs member 0 on test (right only by the ensemble / only "
            "by member 0, exact McNemar): " + "; ".join(cells)
        )
    return "\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--precision", help="of members 1, ... (default: the stage's)")


if __name__ == "__main__":
    probe_runs.cli(
        __doc__, add_options, lambda a: train_members(a.workdir, a.members, a.precision), table
    )
