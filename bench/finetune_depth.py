"""What training deeper would cost: one fine-tune training step, by cut, on this machine.

    .venv/bin/python bench/finetune_depth.py [--cuts mixed_8 mixed_7 mixed_5 mixed_2 image]

The fine-tunes train the blocks after `activations.cut` on cached activations; a lower cut
trains more of the backbone, and `image` (the backbone's input layer) trains all of it. For
each cut and precision, in a fresh process, this builds finetune_keras' model (`build_top` at
the cut, the Keras head's architecture on top, the trainable flags the stage sets: all but
batch norm) with its optimizer (SGD with momentum) and times `--steps` training batches of 32
after two warm-up steps, on random inputs of the cut's shape (a convolution's speed does not
depend on its values). Prints the rows a second, the ratio to the default cut in float32, and
the full set's stage projected from them: the training rows of an epoch (params.yaml's
view_sampling: one view of each training image, or every view) x finetune_keras.epochs at that
speed (training steps only: the stage's validation passes and histograms add about a tenth),
against the issue's 8-minute target.

Needs only a backbone: the repo's models/backbone when `dvc repro backbone` has run, else one
converted in the scratch folder. The machine is shared, so compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402  (needs ROOT on sys.path)
    BATCH,
    load_average,
    phase,
    print_table,
    provide_backbone,
    repo_block,
)
from bench.finetune import FULL_TRAIN_IMAGES, TARGET_MINUTES, full_set_rows  # noqa: E402

DEFAULT_CUTS = ("mixed_8", "mixed_7", "mixed_5", "mixed_2", "image")
PRECISIONS = ("float32", "bfloat16")
WARM_UP_STEPS = 2
N_CLASSES = 5  # the flowers'; the head's size hardly moves the step's cost


def projected_rows() -> tuple[list[str], str, int, int]:
    """params.yaml's train views, view sampling and finetune_keras epochs, and the training rows
    the full set's stage runs with them (one view an image an epoch, or every view)."""
    per_epoch, epochs = full_set_rows("keras")
    views = list(repo_block("activations")["train_views"])
    return views, str(repo_block("finetune_keras")["view_sampling"]), epochs, per_epoch * epochs


def time_steps(workdir: Path, cut: str, precision: str, steps: int) -> dict:
    """Seconds a training step of finetune_keras' model at `cut` takes, after the warm-up."""
    import keras
    import numpy as np

    import imgclf.quiet_tf  # noqa: F401
    from imgclf.finetune.finetune_keras import build_finetune_model, count_parameters
    from imgclf.heads.keras_head import build_model
    from imgclf.inception import build_top, load_backbone

    backbone = load_backbone(workdir / "backbone", precision=precision)
    top = build_top(backbone.model, cut)
    head_params = repo_block("train_keras")
    head = build_model(N_CLASSES, hidden_units=int(head_params["hidden_units"]))
    model = build_finetune_model(top, head)
    recipe = repo_block("finetune_keras")
    model.compile(
        optimizer=keras.optimizers.SGD(float(recipe["learning_rate"]), momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, *top.input.shape[1:]), dtype=np.float32)
    y = rng.integers(0, 5, BATCH)
    for _ in range(WARM_UP_STEPS):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    seconds = (time.perf_counter() - start) / steps
    return {
        "step_seconds": seconds,
        "input_shape": list(top.input.shape[1:]),
        "trained_parameters": count_parameters(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuts", nargs="+", default=list(DEFAULT_CUTS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cut", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(time_steps(args.workdir, args.cut, args.precision, args.steps)))
        return

    views, sampling, epochs, full_rows = projected_rows()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-depth-") as tmp:
        work = Path(tmp)
        provide_backbone(work)
        load_before = load_average()
        for cut in args.cuts:
            for precision in PRECISIONS:
                runs[cut, precision] = phase(
                    "step", work, __file__, cut=cut, precision=precision, steps=args.steps
                )
        load_after = load_average()

    base = runs[args.cuts[0], "float32"]["step_seconds"]
    rows = []
    for (cut, precision), run in runs.items():
        rows_per_second = BATCH / run["step_seconds"]
        minutes = full_rows / rows_per_second / 60
        rows.append(
            (
                f"{cut} {tuple(run['input_shape'])}",
                precision,
                f"{run['trained_parameters'] / 1e6:.1f} M",
                f"{rows_per_second:.1f}",
                f"{run['step_seconds'] / base:.2f}",
                f"{minutes:.1f} ({minutes / TARGET_MINUTES:.1f}x)",
            )
        )
    print(
        f"finetune_keras' training step, batch {BATCH}, {args.steps} steps timed after "
        f"{WARM_UP_STEPS} warm-up, fresh process per row; {load_before} before, {load_after} after"
    )
    print(
        f"full set projected: {FULL_TRAIN_IMAGES} images, {len(views)} views ({sampling}), "
        f"{epochs} epochs = {full_rows} rows, training steps only; target {TARGET_MINUTES:.0f} min"
    )
    print_table(
        rows,
        header=(
            "cut (input of the trained part)",
            "precision",
            "trained params",
            "rows/s",
            f"step time / {args.cuts[0]} float32",
            "full-set stage, min (x target)",
        ),
    )


if __name__ == "__main__":
    main()
