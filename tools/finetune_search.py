"""Recipe search for fine-tuning, on the validation slice only: never reads a test row.

    .venv/bin/python tools/finetune_search.py [--workdir DIR] [--views orig,flip] \
        --variant base='{}' --variant mixup='{"mixup": 0.4, "epochs": 5}' ...

Each variant is finetune_tf's recipe from DIR/params.yaml with some keys replaced (any keyword
of `imgclf.finetune.finetune_tf.train_finetune_tf`, including the regularizers that are not
stage params: `dropout`, `mixup`, `weight_decay`), and `precision`, which picks how the blocks
are built. It trains on DIR's cached train activations
(the views given, default all cached) and the heads' validation slice, exactly as the stage
does, starting from DIR's trained `train_tf` head; nothing in DIR is written. Prints the
validation accuracy of every epoch, and appends one JSON line per variant to `--out`.

DIR is a pipeline workspace that has run `dvc repro activations train@tf` (this checkout by
default; a clone with `data.source` set to the full flowers for the README's search). Leave the
code of the checkout that runs the search alone until it ends: TensorFlow's autograph reads a
`tf.function`'s source file again when it traces, so an edit made meanwhile can break a variant
that starts later.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Set by the search itself: the data, where the events go, the seed of the heads' slice.
FIXED = {"top", "head", "x_train", "y_train", "x_val", "y_val", "cut", "tensorboard_dir",
         "train_images", "seed", "progress"}  # fmt: skip


def search(workdir: Path, variants: dict[str, dict], views: list[str] | None) -> list[dict]:
    import numpy as np
    import yaml

    import imgclf.quiet_tf  # noqa: F401
    from imgclf.activations import load_activations
    from imgclf.finetune.common import (
        SelectedRows,
        load_finetune_data,
        refit_head,
        split_recipe,
    )
    from imgclf.finetune.finetune_tf import train_finetune_tf
    from imgclf.heads.tf_head import load_tf_head
    from imgclf.inception import build_top, load_backbone
    from imgclf.layout import Layout
    from imgclf.params import HeadsParams
    from imgclf.registry import base_params, get_model, model_params

    # precision and refit_head: stage params that pick the blocks' build and the head's start,
    # not trainer keywords.
    known = set(inspect.signature(train_finetune_tf).parameters) - FIXED
    known |= {"precision", "refit_head"}
    for name, changes in variants.items():  # before any training: a typo costs no minutes
        if unknown := sorted(set(changes) - known):
            raise SystemExit(f"--variant {name}: unknown key(s) {unknown}; expected some of "
                             f"{sorted(known)}")  # fmt: skip
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    layout = Layout.from_params(params, workdir)
    cut = params["activations"]["cut"]
    heads = HeadsParams.from_params(params)
    recipe = model_params(get_model("finetune_tf"), params)
    acts = load_activations(layout.activations, "train")
    data = load_finetune_data(acts, heads.validation_fraction, heads.seed)
    views = list(views or acts.views)
    if missing := [v for v in views if v not in acts.views]:
        raise SystemExit(f"--views: {missing} not in {layout.activations}/train_index.npz, "
                         f"which holds {list(acts.views)}")  # fmt: skip
    rows = data.x_train.rows[np.isin(acts.view[data.x_train.rows],
                                     [acts.views.index(v) for v in views])]  # fmt: skip
    _, images = np.unique(acts.ids[rows], return_inverse=True)
    train = dataclasses.replace(data, x_train=SelectedRows(acts.x, rows),
                                y_train=acts.labels[rows].astype(np.int64),
                                train_images=images)  # fmt: skip
    base = get_model("finetune_tf").base
    assert base is not None
    results = []
    # Read once: the trainer copies their values into its own variables and leaves them as
    # they were, so every variant starts from the same top and head.
    size = params["activations"]["image_size"]
    tops: dict[str, Any] = {}
    head = load_tf_head(layout.model_dir(base))
    refitted: dict[str, Any] = {}  # per precision: every variant shares the views, so the refit
    for name, changes in variants.items():
        kwargs, settings = split_recipe({**recipe, **changes})  # test-time flips: judged apart
        precision, refit = settings.precision, settings.refit_head
        if precision not in tops:
            backbone = load_backbone(layout.backbone, precision=precision, image_size=size)
            tops[precision] = build_top(backbone.model, cut)
        top = tops[precision]
        started = time.perf_counter()
        if refit and precision not in refitted:  # the head the stage would refit
            n_classes = int(head.final_weights.shape[1])
            refitted[precision] = refit_head(base, top, train, n_classes=n_classes,
                                             seed=heads.seed,
                                             recipe=base_params("finetune_tf", params))  # fmt: skip
        start = refitted[precision] if refit else head
        with tempfile.TemporaryDirectory() as tensorboard:
            result = train_finetune_tf(
                top, start, train.x_train, train.y_train, data.x_val, data.y_val, cut=cut,
                tensorboard_dir=tensorboard, train_images=train.train_images, seed=heads.seed,
                progress=False, **kwargs,
            )  # fmt: skip
        val = [row["val_accuracy"] for row in result.curve]
        kept = int(result.summary["model_step"])  # the stage's pick: epoch_rank
        results.append({
            "variant": name, "changes": changes, "views": views,
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT)
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
    results = search(args.workdir.resolve(), variants, views)
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
