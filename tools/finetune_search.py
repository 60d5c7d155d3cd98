"""Recipe search for fine-tuning, on the validation slice only: never reads a test row.

    .venv/bin/python tools/finetune_search.py [--workdir DIR] [--model finetune_keras] \
        [--views orig,flip] --variant base='{}' --variant lr='{"learning_rate": 3e-4}' ...

Each variant is the fine-tuned model's recipe (`--model`, default finetune_tf) from
DIR/params.yaml with some keys replaced: any keyword of the model's train function (for
finetune_tf that includes the regularizers that are not stage params: `dropout`, `mixup`,
`weight_decay`), `precision`, which picks how the blocks are built, and `refit_head`. It trains
on DIR's cached train activations (the views given, default all cached) and the heads'
validation slice, exactly as the stage does, starting from DIR's trained base head (`train_tf`
or `train_keras`); nothing in DIR is written. Prints the validation accuracy of every epoch,
and appends one JSON line per variant to `--out`.

DIR is a pipeline workspace that has run `dvc repro activations train@tf train@keras` (this
checkout by default; a clone with `data.source` set to the full flowers for the search in
docs/finetuning-levers.md). Leave the code of the checkout that runs the search alone until it
ends: TensorFlow's autograph reads a `tf.function`'s source file again when it traces, so an
edit made meanwhile can break a variant that starts later.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Set by the search itself: the data, where the events go, the seed of the heads' slice.
FIXED = {"top", "head", "x_train", "y_train", "x_val", "y_val", "cut", "tensorboard_dir",
         "train_images", "seed", "progress"}  # fmt: skip


def search(workdir: Path, variants: dict[str, dict], views: list[str] | None,
           model: str = "finetune_tf") -> list[dict]:  # fmt: skip
    import numpy as np

    import imgclf.quiet_tf  # noqa: F401
    from imgclf.finetune.common import keep_training_rows, split_recipe
    from imgclf.registry import get_model, model_params
    from tools.probe_runs import load_workspace, refitted_head, train_like_stage, trained_head

    spec = get_model(model)
    if spec.base is None:
        raise SystemExit(f"--model {model}: not a fine-tuned model (it has no base head)")
    trainer_keys = set(inspect.signature(spec.function("train")).parameters)
    # precision and refit_head: stage params that pick the blocks' build and the head's start,
    # not trainer keywords.
    known = (trainer_keys - FIXED) | {"precision", "refit_head"}
    for name, changes in variants.items():  # before any training: a typo costs no minutes
        if unknown := sorted(set(changes) - known):
            raise SystemExit(f"--variant {name}: unknown key(s) {unknown}; {model} takes "
                             f"some of {sorted(known)}")  # fmt: skip
    ws = load_workspace(workdir, with_test=False)
    acts, data = ws.acts, ws.data
    views = list(views or acts.views)
    if missing := [v for v in views if v not in acts.views]:
        raise SystemExit(f"--views: {missing} not in {ws.layout.activations}/train_index.npz, "
                         f"which holds {list(acts.views)}")  # fmt: skip
    train = keep_training_rows(data, np.isin(acts.view[data.x_train.rows],
                                             [acts.views.index(v) for v in views]))  # fmt: skip
    results = []
    for name, changes in variants.items():
        _, settings = split_recipe({**model_params(spec, ws.params), **changes})
        # The head the stage would start from: refitted to these rows, or the trained one.
        start = refitted_head(ws, model, train) if settings.refit_head else trained_head(ws, model)
        started = time.perf_counter()
        result = train_like_stage(ws, model, start, train, seed=ws.heads.seed, changes=changes)
        val = [row["val_accuracy"] for row in result.curve]
        kept = int(result.summary["model_step"])  # the stage's pick: epoch_rank
        results.append({
            "variant": name, "model": model, "changes": changes, "views": views,
            "start_val_accuracy": result.summary["start_val_accuracy"],
            "val_accuracy": val, "val_loss": [row["val_loss"] for row in result.curve],
            "train_accuracy": [row["train_accuracy"] for row in result.curve],
            "best_val_accuracy": val[kept - 1], "best_epoch": kept,
            "n_val": len(data.y_val), "seconds": round(time.perf_counter() - started),
        })  # fmt: skip
        print(f"{name}: validation {', '.join(f'{v:.4f}' for v in val)} "
              f"(kept {val[kept - 1]:.4f}, epoch {kept})", flush=True)  # fmt: skip
    return results


def main() -> None:
    from imgclf.registry import model_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT)
    parser.add_argument(
        "--model", default="finetune_tf", choices=model_names(inputs="activations"),
        help="the fine-tuned model whose recipe is searched",
    )  # fmt: skip
    parser.add_argument("--views", help="comma-separated cached train views (default: all)")
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=JSON",
        help="a name and the recipe keys it changes, e.g. mixup='{\"mixup\": 0.4}'",
    )
    parser.add_argument("--out", type=Path, default=Path("finetune_search.jsonl"))
    args = parser.parse_args()
    variants = {}
    for spec in args.variant:
        name, _, changes = spec.partition("=")
        variants[name] = json.loads(changes or "{}")
    views = args.views.split(",") if args.views else None
    results = search(args.workdir.resolve(), variants, views, args.model)
    with args.out.open("a") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    print("\n| variant | validation accuracy by epoch | best |\n|---|---|---:|")
    for r in results:
        curve = ", ".join(f"{v:.1%}" for v in r["val_accuracy"])
        best = f"{r['best_val_accuracy']:.1%} (epoch {r['best_epoch']})"
        print(f"| {r['variant']} {json.dumps(r['changes'])} | {curve} | {best} |")


if __name__ == "__main__":
    main()
