"""Benchmark of the two fine-tune stages: training speed, peak RSS, projected full-set minutes.

    .venv/bin/python bench/finetune.py [IMAGE_FOLDER] [--per-class 40] [--epochs 3]

IMAGE_FOLDER is a class-folder tree (default ../shared/datasets/flower_photos); `--per-class N`
takes the first N images of each class. In a scratch workspace (nothing is written to the repo)
it splits them, computes their bottlenecks and activations (params.yaml's cut and views), trains
the tf and keras heads the fine-tunes start from, then runs each fine-tune exactly as its stage
does (`stages.finetune_tf` / `stages.finetune_keras` on a params.yaml whose recipe is the repo's
with `--epochs`), each in a fresh process: its own peak RSS, nothing warmed by another.

Measured per run: the training rows a second (the stage's real epoch: the steps, the validation
pass, the TensorBoard histograms and probe gradients), from the wall times of the epochs'
TensorBoard events, so tf.function tracing (epochs 1 and 2) is counted once, apart. Projected: the
full-set stage for params.yaml's recipe (`--full-images` training images x its train views x
its epochs) at that speed, plus the run's fixed costs, against the issue's 8-minute target;
and the same from CPU seconds (sampled in the phase and read off at the same events) spread
over all cores: what an idle machine would take if the step used every core, a bound that
holds better than wall speed while other jobs load the machine.

Also timed, each stage with `precision: bfloat16` (the blocks' convolutions in bfloat16,
weights float32: Keras' `mixed_bfloat16` policy, the TF module's convolutions cast). That pays
only on a CPU with AVX512-BF16 (or AMX); elsewhere it is several times slower.
Prints one table; the machine is shared, so compare the ratios, and mind the load in the header.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402  (needs ROOT on sys.path)
    BATCH,
    DEFAULT_IMAGES,
    check_image_folder,
    load_average,
    phase,
    prepare,
    print_table,
    repo_block,
    sample_tree,
)

TARGET_MINUTES = 8.0
TARGET_RSS_GIB = 6.0
# Training images of the full 3,670-photo set (3,666 kept, 80/20 split), as the issue counts.
FULL_TRAIN_IMAGES = 2645
# The peak RSS is projected as the sample's plus one float16 copy of each extra validation row
# (held in memory). Training rows are read a batch at a time with plain reads (NpyRows), so
# they add nothing: through a memory map, every row an epoch touched counted in the RSS, and
# ten views' 4.8 GB train.npy took finetune_tf to 6.13 GiB, 4.69 of it the map's pages. Before
# that, Keras' fit on the whole array held it several times over (8.05 GiB on the full set).
# The heads only have to exist (the fine-tunes start from them): short trainings, the same code.
HEAD_OVERRIDES = {"train_tf": {"steps": 300, "eval_every": 100}, "train_keras": {"epochs": 10}}
RUNS = (("tf", "float32"), ("keras", "float32"), ("keras", "bfloat16"), ("tf", "bfloat16"))


# ---- the workspace's params.yaml ----------------------------------------------------------


def bench_params(epochs: int) -> dict[str, Any]:
    """The repo's params.yaml with the workspace's paths, short head trainings and `epochs`
    fine-tune epochs; the recipes are otherwise the repo's."""
    from imgclf.config import load_params

    params = load_params(ROOT / "params.yaml")
    params["paths"] = {
        **params["paths"],
        "split": "split",
        "backbone": "backbone",
        "bottlenecks": "bottlenecks",
        "activations": "activations",
        "models": "models",
        "metrics": "metrics",
        "tensorboard": "tensorboard",
    }
    for block, values in HEAD_OVERRIDES.items():
        params[block] = {**params[block], **values}
    for block in ("finetune_tf", "finetune_keras"):
        params[block] = {**params[block], "epochs": epochs}
    return params


# ---- phases (each runs in its own process) ------------------------------------------------


def run_inputs(workdir: Path) -> dict:
    """Bottlenecks, the tf and keras heads, the activations: what the fine-tunes read."""
    import imgclf.quiet_tf  # noqa: F401
    from imgclf.activations import ActivationsOptions, run_activations
    from imgclf.bottlenecks import run_bottlenecks
    from imgclf.config import load_params
    from imgclf.heads.common import train_model

    params = load_params(workdir / "params.yaml")
    paths = params["paths"]
    run_bottlenecks(
        split_dir=workdir / paths["split"],
        backbone_dir=workdir / paths["backbone"],
        out_dir=workdir / paths["bottlenecks"],
        precision=params["bottlenecks"]["precision"],
        batch_size=BATCH,
        progress=False,
    )
    for head in ("tf", "keras"):
        train_model(head, params, workdir)
    stats = run_activations(
        split_dir=workdir / paths["split"],
        backbone_dir=workdir / paths["backbone"],
        out_dir=workdir / paths["activations"],
        cache_root=workdir / "cache" / "activations",
        options=ActivationsOptions.from_params(params["activations"]),
        progress=False,
    )
    return {"entries": stats["entries"]["computed"]}


def epoch_wall_times(log_dir: Path) -> list[float]:
    """Wall time of the `loss/val` event of epoch 0 (before training) and of `loss/train` of
    each epoch (written after its validation pass), from the TensorBoard events."""
    import tensorflow as tf

    times: dict[int, float] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if (value.tag, event.step == 0) in (("loss/val", True), ("loss/train", False)):
                    times[int(event.step)] = event.wall_time
    return [times[e] for e in sorted(times)]


class CpuClock:
    """Samples (wall time, this process's CPU seconds) in a thread, so that the CPU time spent
    between two TensorBoard events can be read off: on a machine shared with other jobs, CPU
    seconds per row move much less with the load than wall seconds do."""

    def __init__(self, every_s: float = 0.05) -> None:
        import threading
        import time

        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.samples.append((time.time(), time.process_time()))
                self._stop.wait(every_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_at(self, walls: list[float]) -> list[float]:
        import numpy as np

        wall, cpu = np.array(self.samples).T
        return [float(c) for c in np.interp(walls, wall, cpu)]


def rows_an_epoch(images: int, views: int, view_sampling: str) -> int:
    """Training rows an epoch: every view of every image, or one view of each."""
    return images if view_sampling == "one_per_image" else images * views


def full_set_rows(model: str, images: int = FULL_TRAIN_IMAGES) -> tuple[int, int]:
    """(training rows an epoch, epochs) of the full set's finetune_`model` stage at params.yaml's
    train views and recipe: what both fine-tune benches project."""
    views = repo_block("activations")["train_views"]
    recipe = repo_block(f"finetune_{model}")
    return rows_an_epoch(images, len(views), recipe["view_sampling"]), int(recipe["epochs"])


def run_finetune(workdir: Path, model: str, precision: str) -> dict:
    import yaml

    import imgclf.quiet_tf  # noqa: F401
    from imgclf.layout import Layout

    name = f"finetune_{model}"
    # The stage's own option: each run is a fresh process reading the workspace's params.yaml.
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[name] = {**params[name], "precision": precision}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    layout = Layout.from_params(params, workdir)
    if model == "tf":
        from stages.finetune_tf import main
    else:
        from stages.finetune_keras import main
    clock = CpuClock()
    main()
    clock.stop()
    metrics = json.loads(layout.train_metrics(name).read_text())
    walls = epoch_wall_times(layout.tensorboard_dir(name))
    cpus = clock.cpu_at(walls)
    return {
        "rows": rows_an_epoch(
            metrics["n_train_images"], metrics["n_train_views"], params[name]["view_sampling"]
        ),
        "val_rows": metrics["n_val"],
        "train_images": metrics["n_train_images"],
        "epochs": metrics["epochs"],
        "train_seconds": metrics["train_seconds"],
        "epoch_seconds": [b - a for a, b in itertools.pairwise(walls)],
        "epoch_cpu_seconds": [b - a for a, b in itertools.pairwise(cpus)],
        "start_val_accuracy": metrics["start_val_accuracy"],
        "best_val_accuracy": metrics["best_val_accuracy"],
        "row_bytes": _row_bytes(layout.activations),
        "conv_compute_dtype": conv_compute_dtype(layout.model_dir(name), model),
    }


def conv_dtypes(function: Any) -> set[str]:
    """The dtypes of the Conv2D ops a concrete function runs (nested functions included)."""
    import tensorflow as tf

    graph = function.graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    return {tf.as_dtype(n.attr["T"].type).name for n in nodes if n.op == "Conv2D"}


def conv_compute_dtype(model_dir: Path, model: str) -> str:
    """What the blocks' convolutions computed in, read off the saved model (so a precision
    that did not take shows here): the Conv2D ops of the SavedModel's graph, the Conv2D
    layers' policies of the .keras file."""
    if model == "tf":
        from imgclf.finetune.finetune_tf import SIGNATURE_KEY, load_finetune_tf

        return "/".join(sorted(conv_dtypes(load_finetune_tf(model_dir).signatures[SIGNATURE_KEY])))
    import keras

    from imgclf.finetune.finetune_keras import load_finetune_keras
    from imgclf.inception import all_layers

    saved = load_finetune_keras(model_dir)
    dtypes = {
        layer.dtype_policy.compute_dtype
        for layer in all_layers(saved)
        if isinstance(layer, keras.layers.Conv2D)
    }
    return "/".join(sorted(dtypes))


def _row_bytes(activations_dir: Path) -> int:
    from imgclf.activations import NpyRows

    return NpyRows(activations_dir / "train.npy").row_bytes


# ---- the table ----------------------------------------------------------------------------


def speed(run: dict, clock: str = "wall") -> tuple[float, float]:
    """(training rows a second in the steady epochs, the first two epochs' extra seconds), in
    wall seconds or in CPU seconds (`clock="cpu"`).

    Epoch 1 traces the step; the probe-gradient function is traced after epoch 1's event, so
    in epoch 2's interval: the steady speed is that of epochs 3 on, when there are any."""
    epochs = run["epoch_seconds" if clock == "wall" else "epoch_cpu_seconds"]
    warm = min(len(epochs) - 1, 2)  # epochs counted as warm-up (none when only one ran)
    steady = sum(epochs[warm:]) / len(epochs[warm:])
    return run["rows"] / steady, max(sum(epochs[:warm]) - warm * steady, 0.0)


def projection(
    run: dict, full_rows: int, full_images: int, epochs: int
) -> tuple[float, float, float]:
    """(projected minutes of the full-set stage, `full_rows` training rows an epoch, at this
    run's wall speed; the same from its CPU time spread over every core, i.e. on an idle
    machine with perfect scaling; projected peak RSS in GiB, `full_images` training images)."""
    minutes = {}
    for clock, total in (("wall", run["wall_s"]), ("cpu", run["cpu_s"])):
        rate, warm_up = speed(run, clock)
        per_epoch = run["epoch_seconds" if clock == "wall" else "epoch_cpu_seconds"]
        fixed = total - sum(per_epoch)  # start-up, loading, saving
        minutes[clock] = (fixed + warm_up + epochs * full_rows / rate) / 60
    full_val = full_images * run["val_rows"] / run["train_images"]  # the same fraction
    rss = run["peak_rss_gib"] + max(full_val - run["val_rows"], 0) * run["row_bytes"] / 2**30
    return minutes["wall"], minutes["cpu"] / (os.cpu_count() or 1), rss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="?", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--per-class", type=int, default=40, help="images per class (0: all)")
    parser.add_argument(
        "--epochs", type=int, default=3, help="fine-tune epochs timed (3: warm-up apart)"
    )
    parser.add_argument(
        "--full-images",
        type=int,
        default=FULL_TRAIN_IMAGES,
        help="training images of the full set, for the projection",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        report = {
            "prepare": lambda: {"images": prepare(args.workdir, args.source)},
            "inputs": lambda: run_inputs(args.workdir),
            "finetune": lambda: run_finetune(args.workdir, args.model, args.precision),
        }[args.phase]()
        print(json.dumps(report))
        return

    check_image_folder(args.images)
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, not {args.epochs}")
    import yaml

    params = bench_params(args.epochs)
    views = params["activations"]["train_views"]
    full_rows, full_epochs = {}, {}
    for m in ("tf", "keras"):
        full_rows[m], full_epochs[m] = full_set_rows(m, args.full_images)

    runs: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        source = sample_tree(args.images.resolve(), work / "sample", args.per_class)
        n = phase("prepare", work, __file__, source=source)["images"]
        load_before = load_average()
        entries = phase("inputs", work, __file__)["entries"]
        for model, precision in RUNS:
            runs[model, precision] = phase(
                "finetune", work, __file__, model=model, precision=precision
            )
        load_after = load_average()

    first = runs["tf", "float32"]
    print(
        f"{n} images from {args.images} ({args.per_class or 'all'} per class): "
        f"{first['rows']} training rows (views {views}), {entries} activations computed; "
        f"{args.epochs} epoch(s) timed per run, in fresh processes"
    )
    print(f"machine: {load_before} before the runs, {load_after} after (shared with other jobs)")
    from imgclf.runtimes import cpu_flags, resolved_precision

    for model in ("tf", "keras"):
        recipe = repo_block(f"finetune_{model}")
        print(
            f"projected recipe finetune_{model} (params.yaml): {args.full_images} train images x "
            f"{len(views)} views, view_sampling {recipe['view_sampling']} "
            f"({full_rows[model]} rows an epoch) x {recipe['epochs']} epochs, "
            f"batch {recipe['batch_size']}, "
            f"lr {recipe['learning_rate']}, momentum {recipe['momentum']}, "
            f"schedule {recipe['schedule']}, precision {recipe['precision']} "
            f"({resolved_precision(recipe['precision'], cpu_flags())} on this CPU: its rows below)"
        )

    rows = []
    rates = {key: speed(run)[0] for key, run in runs.items()}
    cpu_rates = {key: speed(run, "cpu")[0] for key, run in runs.items()}
    for (model, precision), run in runs.items():
        minutes, idle_minutes, rss = projection(
            run, full_rows[model], args.full_images, full_epochs[model]
        )
        label = f"finetune_{model}, {precision}"
        base = (model, "float32") if precision == "bfloat16" else ("keras", "float32")
        if (model, precision) == ("tf", "float32"):
            ratio = cpu_ratio = "1.00"
        elif precision == "bfloat16":
            ratio = f"{rates[model, precision] / rates[base]:.2f} x {model} float32"
            cpu_ratio = f"{cpu_rates[model, precision] / cpu_rates[base]:.2f} x {model} float32"
        else:
            ratio = f"TF / Keras {rates['tf', 'float32'] / rates[base]:.2f}"
            cpu_ratio = f"TF / Keras {cpu_rates['tf', 'float32'] / cpu_rates[base]:.2f}"
        acc = (
            f"convs {run['conv_compute_dtype']}; val acc {run['start_val_accuracy']:.3f} -> "
            f"{run['best_val_accuracy']:.3f}"
        )
        rows += [
            (f"{label}: training rows/s (wall)", f"{rates[model, precision]:.1f}", ratio, acc),
            (
                f"{label}: training rows per CPU-s",
                f"{cpu_rates[model, precision]:.2f}",
                cpu_ratio,
                "less load-bound",
            ),
            (
                f"{label}: full set, projected (wall / idle)",
                f"{minutes:.1f} / {idle_minutes:.1f} min",
                f"{minutes / TARGET_MINUTES:.2f} / {idle_minutes / TARGET_MINUTES:.2f} of target",
                f"<= {TARGET_MINUTES:.0f} min",
            ),
            (
                f"{label}: peak RSS (sample / projected)",
                f"{run['peak_rss_gib']:.2f} / {rss:.2f} GiB",
                f"{rss / TARGET_RSS_GIB:.2f} of target",
                f"< {TARGET_RSS_GIB:.0f} GiB",
            ),
        ]
    print_table(rows, ("measure", "value", "ratio", "note / target"))


if __name__ == "__main__":
    main()
