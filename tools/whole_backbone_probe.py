"""Would training the whole backbone reach the target? finetune_keras' recipe with every layer
of Inception V3 trained (batch norm still frozen), judged on the validation slice; the test set
is read only by `table`, after.

    .venv/bin/python tools/whole_backbone_probe.py train --workdir DIR --out seed0.npz
    .venv/bin/python tools/whole_backbone_probe.py table seed*.npz

`train`, in a workspace where a seed's fine-tunes ran: the model is `build_top` at the
backbone's input layer (`image`, so the whole backbone) with the trained Keras head on top,
trained by finetune_keras' own trainer with the stage's recipe (`--learning-rate`, `--epochs`
and `--precision` override it) on the stage's rows: every train view of the images outside
the validation slice, its epoch kept by the same rule. Its inputs are pixels instead of cached
activations: each row's image decoded again, its view applied and the backbone's
preprocessing after, as the activations stage computes them, held in memory as float16
(536 KB a row at 299: 2.6 GiB for the full set's 5,276 rows). Writes the probabilities of the
stage's saved finetune_keras model and of the whole-backbone one on the `orig` view of the
validation and test images; writes nothing into DIR.

`table` pools the files (one per split seed): validation right, then the test accuracy and
the exact McNemar test of the whole backbone against the stage's model per seed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import probe_runs  # noqa: E402
from tools.probe_runs import load_runs, mcnemar_cell, mean_sd, right  # noqa: E402

MODEL = "finetune_keras"
INPUT_LAYER = "image"  # build_inception_v3's input: a cut there leaves the whole backbone above
MODELS = ("stage", "whole")


def view_pixels(acts, items: Sequence, rows: np.ndarray, preprocess) -> np.ndarray:
    """float16 [len(rows), S, S, 3]: the preprocessed pixels of each activation row's image
    and view, from the same decode -> view -> preprocess path as the activations stage."""
    from imgclf.activations import VIEWS
    from imgclf.features import image_batches

    by_id = {item.id: item for item in items}
    out: np.ndarray | None = None
    for v, view in enumerate(acts.views):
        where = np.flatnonzero(acts.view[rows] == v)
        paths = [by_id[image_id].path for image_id in acts.ids[rows[where]]]
        start = 0
        for batch in image_batches(paths, preprocess, 64, VIEWS[view]):
            if out is None:
                out = np.empty((len(rows), *batch.shape[1:]), np.float16)
            out[where[start : start + len(batch)]] = np.asarray(batch)
            start += len(batch)
    assert out is not None, "no rows"
    return out


def train_whole(workdir: Path, learning_rate: float | None, epochs: int | None,
                precision: str | None) -> dict[str, np.ndarray]:  # fmt: skip
    import functools

    import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its notices)
    from imgclf.features import split_items
    from imgclf.finetune.common import split_recipe
    from imgclf.finetune.finetune_keras import predict_in_batches
    from imgclf.inception import PREPROCESSORS, build_top, load_backbone
    from imgclf.registry import get_model, model_params
    from imgclf.stage import peak_rss_bytes

    ws = probe_runs.load_workspace(workdir)
    params, layout, heads, acts, test, data = (ws.params, ws.layout, ws.heads, ws.acts, ws.test,
                                               ws.data)  # fmt: skip
    size = params["activations"]["image_size"]
    spec = get_model(MODEL)
    assert spec.base is not None
    recipe, settings = split_recipe(model_params(spec, params))
    if settings.refit_head:
        raise SystemExit(f"{MODEL}.refit_head: the probe starts from the trained head only")
    recipe.update({k: v for k, v in (("learning_rate", learning_rate), ("epochs", epochs))
                   if v is not None})  # fmt: skip
    test_rows = test.of_view("orig")
    out = ws.labels()
    out["stage_val"], out["stage_test"] = ws.scores(
        spec.function("predictor")(layout.model_dir(MODEL))
    )

    backbone = load_backbone(layout.backbone, precision=precision or settings.precision,
                             image_size=size)  # fmt: skip
    preprocess = functools.partial(PREPROCESSORS[backbone.weights], image_size=size)
    _, items = split_items(layout.split)
    x_train = view_pixels(acts, items["train"], data.x_train.rows, preprocess)
    x_val = view_pixels(acts, items["train"], data.val_rows, preprocess).astype(np.float32)
    first_conv = backbone.model.get_layer("conv").get_weights()[0].copy()
    head = get_model(spec.base).function("load")(layout.model_dir(spec.base))
    with tempfile.TemporaryDirectory() as tmp:
        result = spec.function("train")(
            build_top(backbone.model, INPUT_LAYER), head, x_train, data.y_train, x_val,
            data.y_val, tensorboard_dir=Path(tmp), train_images=data.train_images,
            seed=heads.seed, **recipe,
        )  # fmt: skip
    del x_train
    x_test = view_pixels(test, items["test"], test_rows, preprocess).astype(np.float32)
    out["whole_val"] = predict_in_batches(result.model, x_val)
    out["whole_test"] = predict_in_batches(result.model, x_test)
    out["whole_epoch"] = np.int64(result.summary["model_step"])
    out["whole_seconds"] = np.float64(result.train_seconds)
    out["whole_val_by_epoch"] = np.array([row["val_accuracy"] for row in result.curve])
    # The proof that the lowest layer trained too (the stages never change it).
    change = backbone.model.get_layer("conv").get_weights()[0] - first_conv
    out["first_conv_change"] = np.float64(np.abs(change).max())
    out["peak_rss_bytes"] = np.int64(peak_rss_bytes())
    for name in MODELS:
        print(f"{name}: validation {right(out[f'{name}_val'], data.y_val)} of {len(data.y_val)}",
              flush=True)  # fmt: skip
    print(f"whole: kept epoch {result.summary['model_step']} (validation by epoch "
          f"{', '.join(f'{a:.4f}' for a in out['whole_val_by_epoch'])}), "
          f"{result.train_seconds:.0f} s of training, peak RSS "
          f"{out['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    return out


def table(files: list[Path]) -> str:
    """Validation first (what the rule reads), then test, read after."""
    runs, n_val = load_runs(files)
    lines = [f"| {MODEL} | validation, right of {n_val}; per seed | kept epoch; training s |",
             "|---|---|---|"]  # fmt: skip
    for name in MODELS:
        per_seed = [right(r[f"{name}_val"], r["y_val"]) for r in runs.values()]
        total = sum(per_seed)
        kept = (", ".join(f"{int(r['whole_epoch'])}; {float(r['whole_seconds']):.0f}"
                          for r in runs.values()) if name == "whole" else "")  # fmt: skip
        lines.append(f"| {name} | {total} ({total / n_val:.4f}); "
                     f"{'/'.join(map(str, per_seed))} | {kept} |")  # fmt: skip
    lines += ["", f"Split seeds (files): {', '.join(runs)}.", "", "Test, read after:", "",
              f"| {MODEL} | test accuracy, mean ± sd; per seed |", "|---|---|"]  # fmt: skip
    for name in MODELS:
        acc = [right(r[f"{name}_test"], r["y_test"]) / len(r["y_test"]) for r in runs.values()]
        lines.append(f"| {name} | {mean_sd(acc)} |")
    cells = [mcnemar_cell(seed, r["whole_test"], r["stage_test"], r["y_test"])
             for seed, r in runs.items()]  # fmt: skip
    lines += ["", "Whole backbone vs the stage's model on test (right only by the whole / only "
              "by the stage, exact McNemar): " + "; ".join(cells)]  # fmt: skip
    return "\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learning-rate", type=float, help="default: the stage's")
    parser.add_argument("--epochs", type=int, help="default: the stage's")
    parser.add_argument("--precision", help="default: the stage's")


if __name__ == "__main__":
    probe_runs.cli(
        __doc__,
        add_options,
        lambda a: train_whole(a.workdir, a.learning_rate, a.epochs, a.precision),
        table,
    )
