"""What both fine-tune models share: the rows they train and validate on, the learning-rate
schedule, test-time flips and the TensorBoard log.

The fine-tune models (`finetune_tf`, `finetune_keras`) train the blocks after the activations
stage's cut (mixed_9, mixed_10 at mixed_8) plus the frozen head they start from. Their inputs
are the cached activations, not the bottlenecks; their validation slice is the heads' one
(`validation_split` over the train images, `heads.validation_fraction`, `heads.seed`):

- training rows: every view of every image outside the slice, all of them each epoch
  (`view_sampling: all`) or one view of each image per epoch, drawn anew each epoch
  (`one_per_image`: an epoch then costs one view, however many views are cached);
- validation rows: the `orig` view of the images in the slice, and nothing else of them, so no
  flipped or cropped copy of a validation image is ever trained on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.activations import Activations, NpyRows
from imgclf.backbone_info import IMAGE_SIZE
from imgclf.errors import MissingInput, UserError
from imgclf.fileio import atomic_write_bytes, read_json
from imgclf.heads.common import excluded_from_training
from imgclf.label_audit import without_ids
from imgclf.layout import Layout
from imgclf.splitting import validation_split

SCHEDULES = ("constant", "cosine")
VIEW_SAMPLINGS = ("all", "one_per_image")
CONFIG_FILE = "finetune.json"
HEAD_BLOCK = "head"


class SelectedRows:
    """Some rows of an array on disk (NpyRows) or in memory, read only when indexed:
    `x[positions]` is an in-memory array of those rows, so ten cached views of every image
    need not fit in memory."""

    def __init__(self, source: np.ndarray | NpyRows, rows: np.ndarray) -> None:
        self.source, self.rows = source, np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.source.shape[1:])

    def __getitem__(self, positions: Any) -> np.ndarray:
        return np.asarray(self.source[self.rows[positions]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.source[self.rows], dtype=dtype)


@dataclass(frozen=True)
class FinetuneData:
    """Training and validation rows of the activations (float16)."""

    x_train: SelectedRows  # [rows, h, w, c], read batch by batch
    y_train: np.ndarray  # int64 [rows]
    train_images: np.ndarray  # int64 [rows]: which image each training row is a view of
    x_val: np.ndarray
    y_val: np.ndarray
    val_rows: np.ndarray  # their rows in the activations (the `orig` view)
    n_train_images: int
    n_val_images: int
    views: tuple[str, ...]


def keep_training_rows(data: FinetuneData, keep: np.ndarray) -> FinetuneData:
    """`data` with only the training rows where the boolean mask `keep` is true (e.g. some
    views, or some images); the validation slice unchanged."""
    _, images = np.unique(data.train_images[keep], return_inverse=True)
    return replace(
        data,
        x_train=SelectedRows(data.x_train.source, data.x_train.rows[keep]),
        y_train=data.y_train[keep],
        train_images=images.astype(np.int64),
        n_train_images=int(images.max()) + 1 if images.size else 0,
    )


def check_view_sampling(view_sampling: str) -> None:
    if view_sampling not in VIEW_SAMPLINGS:
        raise ValueError(f"view_sampling must be one of {VIEW_SAMPLINGS}, not {view_sampling!r}")


def epoch_order(
    rng: np.random.Generator, train_images: np.ndarray, view_sampling: str
) -> np.ndarray:
    """The positions of the training rows one epoch visits, in a random order drawn from `rng`:
    every row (`all`), or one row of each image, its view drawn at random (`one_per_image`)."""
    check_view_sampling(view_sampling)
    if view_sampling == "all":
        return rng.permutation(len(train_images))
    by_image = np.argsort(train_images, kind="stable")
    _, starts, counts = np.unique(train_images[by_image], return_index=True, return_counts=True)
    picked = by_image[starts + (rng.random(len(starts)) * counts).astype(np.int64)]
    return rng.permutation(picked)


class TrainingOrder:
    """The draws a seed gives both fine-tunes, from one generator and in this order: the probe
    batch (the training rows whose gradients are logged each epoch), then each epoch's order of
    the training rows (`epoch_order`). So finetune_tf and finetune_keras train on the same
    batches in the same order, and log gradients on the same rows. Without `train_images`
    every row is its own image."""

    def __init__(self, seed: int, n_rows: int, train_images: np.ndarray | None,
                 view_sampling: str, batch_size: int) -> None:  # fmt: skip
        check_view_sampling(view_sampling)
        images = np.arange(n_rows) if train_images is None else np.asarray(train_images)
        self.images, self.view_sampling, self.batch_size = images, view_sampling, batch_size
        rows = len(images) if view_sampling == "all" else int(np.unique(images).size)
        self.steps_per_epoch = -(-rows // batch_size)
        self.rng = np.random.default_rng(seed)
        self.probe = self.rng.permutation(len(images))[:batch_size]

    def next_epoch(self) -> list[np.ndarray]:
        """The next epoch's batches: positions of training rows, each batch sorted (sequential
        reads of the file)."""
        order = epoch_order(self.rng, self.images, self.view_sampling)
        size = self.batch_size
        return [np.sort(order[i : i + size]) for i in range(0, len(order), size)]


@dataclass(frozen=True)
class StageSettings:
    """The keys of a finetune_* params block that are the stage's, not its trainer's."""

    test_time_flip: bool  # a scoring choice, judged apart from training
    # How the blocks are built: Keras' layers carry it as their dtype policy, and finetune_tf's
    # module reads it off them. Never "auto": split_recipe resolves it for this CPU.
    precision: str
    refit_head: bool  # which head the blocks start from


def split_recipe(recipe: Mapping[str, Any]) -> tuple[dict[str, Any], StageSettings]:
    """(the trainer's keyword arguments, the stage's own settings) of a finetune_* block, its
    `precision: auto` resolved for this machine's CPU."""
    from imgclf.runtimes import cpu_flags, resolved_precision

    kwargs = dict(recipe)
    settings = StageSettings(
        test_time_flip=bool(kwargs.pop("test_time_flip")),
        precision=resolved_precision(str(kwargs.pop("precision")), cpu_flags()),
        refit_head=bool(kwargs.pop("refit_head")),
    )
    return kwargs, settings


def finetune_rows(
    acts: Activations, fraction: float, seed: int, exclude: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of the train activations: all views of the training images but
    those in `exclude` (ids), the `orig` view only of the validation images (the heads' slice,
    in image order)."""
    if "orig" not in acts.views:
        raise UserError(
            f"the train activations hold the views {list(acts.views)} but not `orig`, which the "
            "validation slice is scored on: add orig to activations.train_views"
        )
    orig = acts.of_view("orig")
    _, val_idx = validation_split(acts.labels[orig], fraction, seed)
    val_rows = orig[val_idx]
    is_val_image = np.isin(acts.ids, acts.ids[val_rows])
    return without_ids(acts.ids, np.flatnonzero(~is_val_image), exclude), val_rows


def load_finetune_data(
    acts: Activations, fraction: float, seed: int, exclude: Sequence[str] = ()
) -> FinetuneData:
    """The rows of `finetune_rows`: the validation rows in memory, the training rows left in
    the file until a batch reads them."""
    train_rows, val_rows = finetune_rows(acts, fraction, seed, exclude)
    _, train_images = np.unique(acts.ids[train_rows], return_inverse=True)
    return FinetuneData(
        x_train=SelectedRows(acts.x, train_rows),
        y_train=acts.labels[train_rows].astype(np.int64),
        train_images=train_images.astype(np.int64),
        x_val=np.asarray(acts.x[val_rows]),
        y_val=acts.labels[val_rows].astype(np.int64),
        val_rows=val_rows,
        n_train_images=int(train_images.max()) + 1 if train_rows.size else 0,
        n_val_images=int(val_rows.size),
        views=acts.views,
    )


def stage_finetune_data(
    acts: Activations, layout: Layout, shared: Mapping[str, Any]
) -> tuple[FinetuneData, int]:
    """`load_finetune_data` as the fine-tune stages call it, from the heads block (`shared`):
    the heads' slice and seed, and without the label audit's images when drop_label_issues is
    set. Also the number of images so left out."""
    excluded = excluded_from_training(layout, bool(shared["drop_label_issues"]))
    fraction, seed = float(shared["validation_fraction"]), int(shared["seed"])
    return load_finetune_data(acts, fraction, seed, excluded), len(excluded)


def learning_rate_at(step: Any, total_steps: int, learning_rate: float, schedule: str) -> Any:
    """The learning rate of step `step` (0-based): constant, or cosine decay to 0 over
    `total_steps` (Keras' CosineDecay with alpha=0). Works on floats and on tensors."""
    if schedule == "constant":
        return learning_rate
    if schedule == "cosine":
        import tensorflow as tf

        progress = tf.minimum(tf.cast(step, tf.float32) / float(max(total_steps, 1)), 1.0)
        return learning_rate * 0.5 * (1.0 + tf.cos(math.pi * progress))
    raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")


def epoch_rank(val_accuracy: float, val_loss: float, n_val: int) -> tuple[int, float]:
    """How both fine-tunes rank their epochs on the validation slice (higher is better): the
    number of images right first, then the lower log loss. Counted in images, not compared as
    accuracies, so two epochs with the same count tie however the mean was summed. Ties on
    accuracy are common (294 images: one image is 0.34 points), and the earliest of them was
    what the stages kept before, even when a later one fitted the slice better."""
    return round(float(val_accuracy) * int(n_val)), -float(val_loss)


def block_of(variable_path: str) -> str:
    """`mixed_9.tower_conv/kernel` -> `mixed_9`; the head's layers -> `head`."""
    first = variable_path.split("/")[0].split(".")[0]
    return first if first.startswith("mixed") else HEAD_BLOCK


# --------------------------------------------------------------------------------------------
# The head's start: the trained base head, or the same head refitted on the fine-tune's inputs


def pooled_features(top: Any, x: Any, batch_size: int = 128, progress: bool = True) -> np.ndarray:
    """The frozen top's pooled features (pool_3: 2048 a row) of the activation rows `x`,
    float32, read batch by batch (`x` may be rows on disk)."""
    from tqdm import tqdm

    bar = tqdm(range(0, len(x), batch_size), desc="refit_head: pooled features", unit="batch",
               file=sys.stderr, disable=not progress)  # fmt: skip
    batches = [top.predict_on_batch(np.asarray(x[i : i + batch_size], np.float32)) for i in bar]
    return np.concatenate(batches).astype(np.float32)


def refit_head(
    base: str, top: Any, data: FinetuneData, *, n_classes: int, seed: int,
    recipe: Mapping[str, Any],
) -> Any:  # fmt: skip
    """The registered head `base` trained anew by its own train function and `recipe` (its
    train_<base> block) on the pooled features the frozen `top` gives the fine-tune's own rows:
    every train view of the training images, and the validation slice. The head the train
    stage saved was fitted to the bottlenecks (the orig view at 299 pixels); this one is fitted
    to the inputs fine-tuning trains on (their views, activations.image_size), so the blocks
    start from a head that matches them (linear probing, then fine-tuning)."""
    from imgclf.registry import get_model

    result = get_model(base).function("train")(
        pooled_features(top, data.x_train),
        data.y_train,
        pooled_features(top, data.x_val),
        data.y_val,
        n_classes=n_classes,
        seed=seed,
        **recipe,
    )
    return result.model


# --------------------------------------------------------------------------------------------
# The model folder's own settings, beside the model


def write_config(model_dir: Path, config: Mapping[str, Any]) -> None:
    import json

    text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(Path(model_dir) / CONFIG_FILE, text.encode("utf-8"))


def model_config(
    *, test_time_flip: bool, cut: str | None, image_size: int = IMAGE_SIZE
) -> dict[str, Any]:
    """finetune.json: what a fine-tuned model needs beside its weights to be used on images
    (its cut: where the backbone hands over; the side images are resized to before it; whether
    it averages with the flipped view)."""
    config: dict[str, Any] = {"inputs": "activations", "test_time_flip": bool(test_time_flip)}
    if cut is not None:
        config.update(cut=cut, image_size=int(image_size))
    return config


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    return dict(read_json(path))


def model_cut(model_dir: str | Path) -> str:
    """The cut a saved fine-tuned model starts from (finetune.json)."""
    cut = read_config(model_dir).get("cut")
    if not isinstance(cut, str):
        raise MissingInput(
            f"{Path(model_dir) / CONFIG_FILE} does not say the model's cut (activations.cut): "
            "it was saved by an older version; rerun its fine-tune stage (dvc repro)"
        )
    return cut


def model_image_size(model_dir: str | Path) -> int:
    """The input side a saved fine-tuned model's activations were computed at (finetune.json;
    299, the backbone's own, for folders saved before it was a param)."""
    return int(read_config(model_dir).get("image_size", IMAGE_SIZE))


def uses_test_time_flip(model_dir: str | Path) -> bool:
    return bool(read_config(model_dir).get("test_time_flip", False))


def predict_images(
    predict: Callable[[np.ndarray], np.ndarray],
    acts: Activations,
    *,
    test_time_flip: bool,
    rows: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Probabilities [n_images, n_classes] of the images of the `orig` view's `rows` (default:
    all of them, in order), averaged with those of the `flip` view when `test_time_flip` (the
    rows are matched by image id)."""
    views = ["orig", "flip"] if test_time_flip else ["orig"]
    for view in views:
        if view not in acts.views:
            raise UserError(
                f"test-time flips need the `{view}` view of the test images, but the activations "
                f"hold {list(acts.views)}: add {view} to activations.test_views"
                if view == "flip"
                else f"the activations hold {list(acts.views)}, not `orig`"
            )
    images = acts.ids[acts.of_view("orig") if rows is None else rows]
    total = None
    for view in views:
        view_rows = acts.of_view(view)
        position = {image: i for i, image in enumerate(acts.ids[view_rows])}
        view_rows = view_rows[[position[image] for image in images]]
        probs = np.concatenate(
            [
                predict(np.asarray(acts.x[view_rows[i : i + batch_size]], np.float32))
                for i in range(0, len(view_rows), batch_size)
            ]
        )
        total = probs if total is None else total + probs
    assert total is not None
    return (total / len(views)).astype(np.float32)


def accuracy_with_flips(
    predict: Callable[[np.ndarray], np.ndarray], acts: Activations, data: FinetuneData
) -> float | None:
    """Validation accuracy with test-time flips (each image's probabilities averaged with its
    `flip` view's), or None when the activations hold no flip view. The flips of the validation
    images are never trained on (no view of them is), so this is what `test_time_flip` is chosen
    by, at the epoch kept without it."""
    if "flip" not in acts.views or not data.val_rows.size:
        return None
    probs = predict_images(predict, acts, test_time_flip=True, rows=data.val_rows)
    return float(np.mean(probs.argmax(axis=1) == data.y_val))


# --------------------------------------------------------------------------------------------
# TensorBoard


HISTOGRAM_BUCKETS = 30  # tf.summary.histogram's default


def histogram_buckets(values: Any, bucket_count: int = HISTOGRAM_BUCKETS) -> np.ndarray:
    """[bucket_count, 3] float64 rows (left edge, right edge, count) over all elements of
    `values`, as tf.summary.histogram buckets them: equal widths from min to max, the maximum
    in the last bucket; all elements equal: every edge is the value, the count in the last."""
    data = np.asarray(values, dtype=np.float64).ravel()
    buckets = np.zeros((bucket_count, 3))
    if data.size == 0:
        return buckets
    low, high = data.min(), data.max()
    if low == high:
        buckets[:, :2] = high
        buckets[-1, 2] = data.size
        return buckets
    width = (high - low) / bucket_count
    index = np.minimum(np.floor((data - low) / width).astype(np.int64), bucket_count - 1)
    edges = np.linspace(low, high, bucket_count + 1)
    edges[-1] = high
    buckets[:, 0], buckets[:, 1] = edges[:-1], edges[1:]
    buckets[:, 2] = np.bincount(index, minlength=bucket_count)
    return buckets


class TrainingDiverged(UserError):
    pass


def check_finite(name: str, values: np.ndarray, epoch: int) -> None:
    """Stop a fine-tune whose weights or gradients went NaN or infinite, naming them: the
    epochs after would train on NaN, and the histograms cannot be bucketed."""
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise TrainingDiverged(
            f"the fine-tune diverged by epoch {epoch}: {name} holds {bad} NaN or infinite "
            f"values of {np.size(values)}. Lower the learning rate (learning_rate in the "
            "model's block of params.yaml, e.g. by 10x) and rerun."
        )


class TensorBoardLog:
    """Event files under `log_dir` (one writer): scalars and histograms on the epoch axis.

    The files hold wall times, so they live outside the model folder that DVC hashes.
    """

    def __init__(self, log_dir: str | Path) -> None:
        import shutil

        import tensorflow as tf

        self.dir = Path(log_dir)
        # A rerun replaces the previous run's events rather than appending a second curve.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._writer = tf.summary.create_file_writer(str(self.dir))

    def scalars(self, epoch: int, values: Mapping[str, float]) -> None:
        import tensorflow as tf

        with self._writer.as_default(step=int(epoch)):
            for name, value in values.items():
                tf.summary.scalar(name, float(value))

    def histograms(self, epoch: int, values: Iterable[tuple[str, Any]]) -> None:
        """What `tf.summary.histogram` writes (its 30 buckets, for TensorBoard's histogram
        dashboards), counted with a bincount: tf.summary.histogram builds a float64 one-hot
        matrix of values x buckets, 2.7 GB in all for the 11 M kernel weights of mixed_9
        and mixed_10, twice an epoch (weights, gradients). Measured on the tests' tiny fine-tune
        (2 epochs): 8.1 s of its 12.2 s went there, 0.7 s now."""
        import tensorflow as tf
        from tensorboard.plugins.histogram.metadata import create_summary_metadata

        metadata = create_summary_metadata(display_name=None, description=None)
        with self._writer.as_default(step=int(epoch)):
            for name, value in values:
                value = np.asarray(value, dtype=np.float64)
                check_finite(name, value, epoch)
                tf.summary.write(name, histogram_buckets(value), metadata=metadata)

    def gradients(self, epoch: int, named_grads: Iterable[tuple[str, Any]]) -> dict[str, float]:
        """Histograms of each gradient, and the L2 norm of each block's (also returned)."""
        import tensorflow as tf

        squares: dict[str, float] = {}
        named = list(named_grads)
        self.histograms(epoch, ((f"gradients/{name}", g) for name, g in named))
        for name, grad in named:
            block = block_of(name)
            squares[block] = squares.get(block, 0.0) + float(tf.reduce_sum(tf.square(grad)))
        norms = {block: math.sqrt(s) for block, s in squares.items()}
        self.scalars(epoch, {f"gradient_norm/{block}": n for block, n in norms.items()})
        return norms

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


GRADIENT_NORM_PREFIX = "gradient_norm_"


def epoch_row(
    epoch: int,
    train: tuple[float, float],
    val: tuple[float, float],
    gradient_norms: Mapping[str, float] | None = None,
) -> dict[str, float | int]:
    """One curve row: (loss, accuracy) pairs of the epoch's training and of validation, and
    the per-block gradient norms (`gradient_norm_<block>` columns) measured at its end: the
    curve CSV is where track reads them from, as MLflow metrics per epoch."""
    return {
        "epoch": float(epoch),  # every training image seen once per epoch (one or all views)
        "step": int(epoch),
        "train_loss": float(train[0]),
        "train_accuracy": float(train[1]),
        "val_loss": float(val[0]),
        "val_accuracy": float(val[1]),
        **{f"{GRADIENT_NORM_PREFIX}{b}": float(n) for b, n in (gradient_norms or {}).items()},
    }


# --------------------------------------------------------------------------------------------
# What both stages do


def train_and_save_finetune(
    name: str,
    *,
    paths: Mapping[str, str],
    shared: Mapping[str, Any],
    cut: str,
    image_size: int,
    load_head: Callable[[Path], Any],
    train_fn: Callable[..., Any],
    save_fn: Callable[..., None],
    count_parameters: Callable[[Any], int],
    recipe: Mapping[str, Any],
    base_recipe: Mapping[str, Any],
) -> dict[str, Any]:
    """Load the train activations, the backbone's top after `cut` and the registered model's
    `base` head (refitted on the activations' pooled features with `base_recipe`, its train
    block, when `recipe` says refit_head); fine-tune with `recipe`; write the model,
    metrics/train/<name>.json, the curve (with the per-block gradient norms of each epoch) and
    the TensorBoard events, where imgclf/layout.py puts them. Returns the metrics written."""
    import imgclf.quiet_tf  # noqa: F401
    from imgclf.activations import load_activations
    from imgclf.heads.common import read_labels, stopwatch, write_training_metrics
    from imgclf.inception import build_top, load_backbone
    from imgclf.registry import get_model
    from imgclf.runtimes import bfloat16_warning, cpu_flags
    from imgclf.stage import peak_rss_bytes

    spec = get_model(name)
    assert spec.base is not None, f"{name} is registered without a base head"
    layout = Layout.from_params({"paths": paths})
    recipe, settings = split_recipe(recipe)
    flags_warning = bfloat16_warning("tensorflow", settings.precision, name, cpu_flags(),
                                     instead="auto (float32 on this CPU)")  # fmt: skip
    if flags_warning:
        print(flags_warning, file=sys.stderr)
    acts = load_activations(layout.activations, "train")
    head_dir = layout.model_dir(spec.base)
    classes = read_labels(head_dir)
    if acts.labels.size and int(acts.labels.max()) >= len(classes):
        raise UserError(
            f"{layout.activations}/train_index.npz has labels up to {int(acts.labels.max())} "
            f"but {head_dir}/labels.txt lists {len(classes)} classes: the head was trained on "
            "another split; rerun the pipeline (dvc repro)"
        )
    data, n_dropped = stage_finetune_data(acts, layout, shared)
    backbone = load_backbone(layout.backbone, precision=settings.precision, image_size=image_size)
    top = build_top(backbone.model, cut)
    if tuple(top.input.shape[1:]) != tuple(data.x_train.shape[1:]):
        raise UserError(
            f"{layout.activations}/train.npy holds activations of shape "
            f"{tuple(data.x_train.shape[1:])}, but the backbone's {cut} gives "
            f"{tuple(top.input.shape[1:])} on {image_size}x{image_size} images "
            "(activations.cut, activations.image_size): rerun the activations stage "
            "(dvc repro activations)"
        )
    refit_seconds = 0.0
    if settings.refit_head:  # the trained head is then not loaded at all
        with stopwatch() as timer:
            head = refit_head(spec.base, top, data, n_classes=len(classes),
                              seed=int(shared["seed"]), recipe=base_recipe)  # fmt: skip
        refit_seconds = timer["seconds"]
    else:
        head = load_head(head_dir)
    result = train_fn(
        top,
        head,
        data.x_train,
        data.y_train,
        data.x_val,
        data.y_val,
        tensorboard_dir=layout.tensorboard_dir(name),
        train_images=data.train_images,
        seed=int(shared["seed"]),
        **recipe,
    )
    result.summary.update(
        {
            "n_train_images": data.n_train_images,
            "n_train_views": len(data.views),
            "test_time_flip": int(settings.test_time_flip),
            "precision": settings.precision,
            "refit_head": int(settings.refit_head),
            "refit_head_seconds": refit_seconds,
        }
    )
    save_fn(
        result.model,
        layout.model_dir(name),
        classes,
        test_time_flip=settings.test_time_flip,
        cut=cut,
        image_size=image_size,
    )
    # Read off the saved model, as evaluate scores it (its precision included).
    with_flips = accuracy_with_flips(spec.function("predictor")(layout.model_dir(name)), acts, data)
    if with_flips is not None:
        result.summary["val_accuracy_with_flips"] = with_flips
    result.summary["peak_rss_bytes"] = peak_rss_bytes()  # the issue's < 6 GiB, per stage
    return write_training_metrics(
        layout.metrics,
        name,
        result,
        n_parameters=count_parameters(result.model),
        n_train=len(data.y_train),
        n_val=len(data.y_val),
        n_classes=len(classes),
        n_dropped=n_dropped,
    )


def report(name: str, metrics: Mapping[str, Any]) -> str:
    flips = metrics.get("val_accuracy_with_flips")
    refit = metrics.get("refit_head")
    return (
        f"{name}: val_accuracy {metrics['start_val_accuracy']:.4f} before"
        + (f" (head refitted, {metrics['refit_head_seconds']:.1f} s)" if refit else "")
        + ", best "
        f"{metrics['best_val_accuracy']:.4f} (kept epoch {metrics['model_step']} of "
        f"{metrics['epochs']}"
        + ("" if flips is None else f"; {flips:.4f} with test-time flips")
        + f"), {metrics['train_seconds']:.1f} s, peak RSS "
        f"{metrics['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
