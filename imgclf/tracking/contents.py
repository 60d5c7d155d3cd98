"""A pipeline result's files (`ResultFiles`) and what of them an MLflow run holds: params
flattened, metrics, the training curves on one x-axis, a classification report, the per-class
table and the train and test sets as datasets."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.fileio import read_csv
from imgclf.layout import Layout
from imgclf.registry import MODELS

_MAX_PARAM = 6000  # MLflow's limit on a param value (MAX_PARAM_VAL_LENGTH)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (logged as JSON)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."


def numeric_leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics JSON, flattened; strings and booleans are left out."""
    return {
        key: float(value)
        for key, value in flatten(tree, prefix).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def classification_report(evaluation: Mapping[str, Any]) -> str:
    """A plain-text per-class report (sklearn's layout) from metrics/evaluate/<head>.json."""
    per_class = evaluation.get("per_class", {})
    width = max([len("macro avg"), *(len(c) for c in per_class)])
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for name, row in per_class.items():
        lines.append(
            f"{name:>{width}}  {row['precision']:9.4f} {row['recall']:9.4f} "
            f"{row['f1']:9.4f} {row['support']:9d}"
        )
    lines.append("")
    n = evaluation.get("n_test", sum(r["support"] for r in per_class.values()))
    if "accuracy" in evaluation:
        lines.append(f"{'accuracy':>{width}}  {'':9} {'':9} {evaluation['accuracy']:9.4f} {n:9d}")
    if per_class:
        macro = [
            sum(r[k] for r in per_class.values()) / len(per_class)
            for k in ("precision", "recall", "f1")
        ]
        lines.append(
            f"{'macro avg':>{width}}  {macro[0]:9.4f} {macro[1]:9.4f} {macro[2]:9.4f} {n:9d}"
        )
    if "ci_low" in evaluation:
        lines.append("")
        lines.append(
            f"accuracy 95% CI ({evaluation.get('ci_method', '')}): "
            f"[{evaluation['ci_low']:.4f}, {evaluation['ci_high']:.4f}]"
        )
    return "\n".join(lines) + "\n"


CURVE_PREFIX = "curve."
# The fine-tune stages' per-block gradient norms: curve columns gradient_norm_<block>
# (imgclf.finetune.common.GRADIENT_NORM_PREFIX, not imported: that loads the activations code),
# logged as gradient_norm.<block> per epoch.
GRADIENT_COLUMN_PREFIX = "gradient_norm_"
GRADIENT_METRIC_PREFIX = "gradient_norm."


def curve_metrics(curve_csv: str | Path, n_train: int) -> list[tuple[str, float, int]]:
    """(`curve.<column>`, value, step) for every numeric column of a curves CSV (`epoch`
    included, `step` left out). MLflow steps are integers, so the step is the number of
    training images seen, round(epoch * n_train): the same axis for every head (the heads share
    the training slice), which lets the compare view overlay the TF and Keras curves; choose
    `curve.epoch` as the x-axis of a chart to read it in epochs. The gradient_norm_<block>
    columns of a fine-tuned model become `gradient_norm.<block>` at step = the epoch."""
    out = []
    for row in read_csv(curve_csv):
        images_seen = round(float(row["epoch"]) * n_train)
        for key, value in row.items():
            if key == "step" or value in ("", None):
                continue
            try:
                number = float(value)
            except ValueError:
                continue
            if key.startswith(GRADIENT_COLUMN_PREFIX):
                block = key[len(GRADIENT_COLUMN_PREFIX) :]
                out.append((f"{GRADIENT_METRIC_PREFIX}{block}", number, round(float(row["epoch"]))))
            else:
                out.append((f"{CURVE_PREFIX}{key}", number, images_seen))
    return out


# metrics/train/<head>.json numbers that are settings of the training, not results: params,
# not metrics. (Its .info.json names, such as the optimizer, are params anyway.)
TRAIN_SETTINGS = frozenset(
    {
        "batch_size",
        "learning_rate",
        "hidden_units",
        "dropout",
        "early_stopping_patience",
        "max_epochs",
        "momentum",
        "label_smoothing",
        "n_train_views",
        "test_time_flip",
        "eval_every",
        "n_train",
        "n_val",
        "n_classes",
    }
)


def split_train_summary(summary: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(params, metrics) of metrics/train/<head>.json with its .info.json part (read_metrics):
    the settings and the names and flags (optimizer, precision, converged) as `train.<key>`
    params, the other numbers as `train.<key>` metrics, the wall time as `training_seconds`."""
    params = {
        f"train.{k}": v
        for k, v in summary.items()
        if k in TRAIN_SETTINGS or isinstance(v, str | bool)
    }
    metrics = {}
    for key, value in numeric_leaves(summary).items():
        if key in TRAIN_SETTINGS:
            continue
        metrics["training_seconds" if key == "train_seconds" else f"train.{key}"] = value
    return params, metrics


def per_class_table(evaluation: Mapping[str, Any]) -> dict[str, list]:
    """metrics/evaluate/<head>.json's per-class scores as columns (mlflow.log_table)."""
    per_class = evaluation.get("per_class", {})
    return {
        "class": list(per_class),
        **{
            key: [row.get(key) for row in per_class.values()]
            for key in ("precision", "recall", "f1", "support")
        },
    }


def subset_dataset(split_manifest: str | Path, subset: str, source: str, name: str) -> Any:
    """The `subset` (train/test) rows of the split manifest as an MLflow dataset: digest = the
    sha256 of those rows (16 hex digits), source = data.source, targets = class."""
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.pandas_dataset import PandasDataset

    rows = [r for r in read_csv(split_manifest) if r.get("subset") == subset]
    frame = pd.DataFrame(rows)
    canonical = frame.to_csv(index=False, lineterminator="\n").encode()
    digest = hashlib.sha256(canonical).hexdigest()[:16]
    # A URL stays a URL (HTTP source); a path is made absolute (a local artifact source).
    uri = str(source) if "://" in str(source) else str(Path(source).expanduser().resolve())
    with warnings.catch_warnings():
        # MLflow registers its local artifact source twice (schemes "" and "file"), so every
        # local path "can be interpreted in multiple ways": two classes of the same name.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        dataset_source = resolve_dataset_source(uri)
    return PandasDataset(df=frame, source=dataset_source, targets="class", name=name, digest=digest)


def log_datasets(client: Any, run_id: str, datasets: Mapping[str, Any]) -> None:
    """Each dataset as an input of the run, tagged with its context (train, test)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, ctx)])
            for ctx, ds in datasets.items()
        ],
    )


@dataclass(frozen=True)
class ResultFiles:
    """Where a pipeline result's files are, from params.yaml `paths` (relative to `workdir`),
    and which of them a model's run logs."""

    layout: Layout

    @classmethod
    def from_params(cls, params: Mapping[str, Any], workdir: str | Path) -> ResultFiles:
        return cls(layout=Layout.from_params(params, workdir))

    @property
    def metrics(self) -> Path:
        return self.layout.metrics

    @property
    def backbone(self) -> Path:
        return self.layout.backbone

    def head_dir(self, head: str) -> Path:
        return self.layout.model_dir(head)

    def tensorboard_dir(self, head: str) -> Path | None:
        """A fine-tuned model's TensorBoard events, if its stage wrote them."""
        folder = self.layout.tensorboard_dir(head)
        fine_tuned = head in MODELS and MODELS[head].fine_tuned
        return folder if fine_tuned and folder.is_dir() else None

    def head_artifacts(self, head: str) -> list[tuple[Path, str]]:
        """(file, artifact folder) of one head; files that do not exist are skipped, and so is
        the (header-only) curve of a model without one."""
        lay = self.layout
        has_curve = head not in MODELS or MODELS[head].has_curve
        return [
            (lay.confusion(head, ".png"), "evaluation/confusion"),
            (lay.confusion(head), "evaluation/confusion"),
            (lay.misclassified(head, ".png"), "evaluation/misclassified"),
            (lay.misclassified(head), "evaluation/misclassified"),
            (lay.evaluation(head), "evaluation"),
            (lay.train_metrics(head), "training"),
            *([(lay.curve(head), "training")] if has_curve else []),
            (self.head_dir(head) / "labels.txt", ""),
        ]
