"""What every head shares: its training rows, seeding, metrics output, the saved model folder.

The comparison is only fair if the heads differ in nothing but the head: the same train
bottlenecks (imgclf/bottleneck_files.py), the same validation slice carved out of train, never
the test set (imgclf/splitting.py's validation_split), the same seed, and the same metric
files. Everything here is framework-free except `set_determinism`, which
imports TensorFlow/Keras lazily so that the scikit-learn stage stays light.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.bottleneck_files import Bottlenecks, load_bottlenecks
from imgclf.errors import MissingInput
from imgclf.evaluation import log_loss
from imgclf.fileio import atomic_write_bytes, write_csv, write_metrics
from imgclf.label_audit import read_label_issues, without_ids
from imgclf.layout import Layout
from imgclf.splitting import validation_split

# `epoch` (training images seen / training-set size, a float) is the one x-axis every head's
# curve shares; `step` is the head's own counter (SGD steps for tf, epochs for keras).
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "step")
LABELS_FILE = "labels.txt"


@dataclass
class TrainResult:
    """What a `train_*_head` function hands back to its stage.

    `curve` rows have the CURVE_COLUMNS keys (empty for heads without a curve); `summary` is the
    framework-specific part of metrics/train/<head>.json (steps or epochs, batch size...).
    """

    model: Any
    curve: list[dict[str, float | int]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and make TF ops deterministic.

    Called at the start of every training, so two trainings in one process are identical too.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def round_sig(value: float, digits: int = 6) -> float:
    """Round to `digits` significant digits: readable diffs in `dvc metrics diff`."""
    value = float(value)
    if not math.isfinite(value) or value == 0.0:
        return value
    return float(f"{value:.{digits}g}")


def round_floats(obj: Any, digits: int = 6) -> Any:
    """round_sig applied to every float inside dicts/lists."""
    if isinstance(obj, float | np.floating):
        return round_sig(float(obj), digits)
    if isinstance(obj, Mapping):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v, digits) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then t["seconds"] holds the wall time."""
    timer = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield timer
    finally:
        timer["seconds"] = time.perf_counter() - start


def accuracy_and_loss(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of predicted probabilities against integer labels; the
    loss is the evaluate stage's log loss."""
    accuracy = float((np.argmax(probabilities, axis=1) == np.asarray(labels)).mean())
    return accuracy, log_loss(labels, probabilities)


def curve_summary(curve: Sequence[Mapping[str, float | int]]) -> dict[str, float | int]:
    """final/best validation accuracy and loss from a training curve."""
    if not curve:
        return {}
    final = curve[-1]
    best_acc = max(curve, key=lambda r: (r["val_accuracy"], -r["step"]))
    best_loss = min(curve, key=lambda r: (r["val_loss"], r["step"]))
    return {
        "final_val_accuracy": final["val_accuracy"],
        "final_val_loss": final["val_loss"],
        "best_val_accuracy": best_acc["val_accuracy"],
        "best_val_accuracy_step": best_acc["step"],
        "best_val_loss": best_loss["val_loss"],
        "best_val_loss_step": best_loss["step"],
    }


def write_labels(model_dir: str | Path, classes: Sequence[str]) -> None:
    """labels.txt, one class per line in label order (retrain.py's output_labels.txt)."""
    text = "".join(f"{c}\n" for c in classes)
    atomic_write_bytes(Path(model_dir) / LABELS_FILE, text.encode("utf-8"))


def save_model_dir(
    model_dir: str | Path, classes: Sequence[str], write_model: Callable[[Path], Any]
) -> None:
    """`write_model(folder)` + labels.txt, built in a folder beside `model_dir` and then moved
    in, so `model_dir` is replaced as a whole."""
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model(tmp)
    write_labels(tmp, classes)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)


def read_labels(model_dir: str | Path) -> list[str]:
    path = Path(model_dir) / LABELS_FILE
    if not path.is_file():
        raise MissingInput(f"{path} not found: retrain the head (dvc repro)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_training_metrics(
    metrics_dir: str | Path,
    head: str,
    result: TrainResult,
    *,
    n_parameters: int,
    n_train: int,
    n_val: int,
    n_classes: int,
    has_curve: bool | None = None,
    n_dropped: int = 0,
) -> dict[str, Any]:
    """Write metrics/train/<head>.json and metrics/curves/<head>.csv (see imgclf/layout.py).

    Called by the train stage (`has_curve` given), the curve file is always written, header only
    for a model without a curve, as dvc.yaml declares the same outs for every model; a direct
    call writes it only when there are rows. Every float is rounded to 6 significant digits; only
    the seconds and the fine-tunes' peak_rss_bytes vary between reruns. The names and flags
    (head, optimizer, converged...) go to `train/<head>.info.json`. Returns all of it.
    """
    layout = Layout.of(metrics=metrics_dir)
    metrics: dict[str, Any] = {
        "head": head,
        "n_parameters": int(n_parameters),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_classes": int(n_classes),
        # Training images left out because the label audit flagged them (heads.drop_label_issues).
        "n_label_issues_dropped": int(n_dropped),
        "train_seconds": round(result.train_seconds, 2),
        **curve_summary(result.curve),
        **result.summary,
    }
    metrics = round_floats(metrics)
    write_metrics(layout.train_metrics(head), metrics)
    if result.curve or has_curve is not None:
        rows = [round_floats(dict(row)) for row in result.curve]
        # The shared columns first; a model's own (the fine-tuned models' gradient_norm_<block>)
        # after them, in the order the rows give them.
        extra = [k for row in rows for k in row if k not in CURVE_COLUMNS]
        write_csv(layout.curve(head), [*CURVE_COLUMNS, *dict.fromkeys(extra)], rows)
    return metrics


def excluded_from_training(layout: Layout, drop_label_issues: bool) -> list[str]:
    """The ids every model trains without: the label audit's list when heads.drop_label_issues
    is true, else none. The validation slice is carved before they are taken out, so it is the
    same either way (the audit never lists its images)."""
    if not drop_label_issues:
        return []
    return read_label_issues(layout.label_issues())


def split_train_val(
    train: Bottlenecks, fraction: float, seed: int, exclude: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val) using the shared validation slice; the training rows
    without the ids in `exclude`."""
    train_idx, val_idx = validation_split(train.labels, fraction, seed)
    train_idx = without_ids(train.ids, train_idx, exclude)
    return (
        train.features[train_idx],
        train.labels[train_idx],
        train.features[val_idx],
        train.labels[val_idx],
    )


def train_model(name: str, params: Mapping[str, Any], workdir: str | Path = ".") -> dict[str, Any]:
    """What the train stage does for registered model `name`: the shared train/validation
    slices, its train function with its params block as keyword arguments, then the model,
    metrics and curve where imgclf/layout.py puts them. Returns the metrics written."""
    from imgclf.params import HeadsParams
    from imgclf.registry import get_model, model_params

    spec = get_model(name)
    if spec.inputs != "bottlenecks":
        raise NotImplementedError(f"model {name!r} trains on {spec.inputs}: not implemented yet")
    layout = Layout.from_params(params, workdir)
    shared = HeadsParams.from_params(params)
    train = load_bottlenecks(layout.bottlenecks, "train")
    excluded = excluded_from_training(layout, shared.drop_label_issues)
    x_train, y_train, x_val, y_val = split_train_val(
        train, shared.validation_fraction, shared.seed, excluded
    )
    result = spec.function("train")(
        x_train,
        y_train,
        x_val,
        y_val,
        n_classes=len(train.classes),
        seed=int(shared.seed),
        **model_params(spec, params),
    )
    spec.function("save")(result.model, layout.model_dir(name), train.classes)
    return write_training_metrics(
        layout.metrics,
        name,
        result,
        n_parameters=spec.function("count_parameters")(result.model),
        n_train=len(y_train),
        n_val=len(y_val),
        n_classes=len(train.classes),
        has_curve=spec.has_curve,
        n_dropped=len(excluded),
    )


# --------------------------------------------------------------------------------------------
# Shared by the Keras models (the head and the fine-tuned top): plain Python, no Keras import.


@contextmanager
def without_stderr_lines(marker: bytes) -> Iterator[None]:
    """Pass everything written to file descriptor 2 (C++ logs included) through, except lines
    containing `marker`. Bytes go through as they come, so tqdm's bar stays live."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            pending += chunk
            if marker in pending and b"\n" not in pending[pending.index(marker) :]:
                continue  # the marked line is not complete yet: wait for its end
            lines = pending.split(b"\n")
            pending = b""
            # Dropping an element of the split drops that line and its newline.
            os.write(saved, b"\n".join(line for line in lines if marker not in line))
        if pending and marker not in pending:
            os.write(saved, pending)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last writer: pump sees EOF
        thread.join(timeout=5)
        os.close(read_fd)
        os.close(saved)


# Keras writes the save time into metadata.json, Python object ids (`shared_object_id`) into
# config.json and stamps the weights member with the clock, so two identical trainings gave
# different files: a new dvc.lock hash for the same model.
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def keras_weights_digest(model: Any) -> bytes:
    """sha256 over the paths, shapes, dtypes and values of a Keras model's weights: what
    identifies a registered model version."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.asarray(weight.numpy())
        digest.update(f"{weight.path}:{value.dtype}:{value.shape}".encode() + value.tobytes())
    return digest.digest()


def normalise_keras_archive(path: Path) -> None:
    """Rewrite a .keras zip without what varies between identical saves: metadata.json's
    date_saved removed, config.json's shared_object_id numbered in order of appearance (they
    only pair up references to one object), every member dated 1980-01-01 (zip's epoch),
    members in Keras's own order. Loading is unchanged."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as dst:
        for info, data in members:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME)
            fixed.compress_type = info.compress_type
            fixed.external_attr = info.external_attr
            dst.writestr(fixed, data)
    tmp.replace(path)


def _renumber_shared_objects(config: Any, ids: dict[int, int] | None = None) -> Any:
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "shared_object_id" and isinstance(value, int):
                out[key] = ids.setdefault(value, len(ids) + 1)
            else:
                out[key] = _renumber_shared_objects(value, ids)
        return out
    if isinstance(config, list):
        return [_renumber_shared_objects(v, ids) for v in config]
    return config
