"""MLflow tracking of a pipeline result: one parent run per result, one child run per head.

What a run records (see `track_pipeline`):

- parent run `<result>` (the DVC experiment name, else repro-<commit>): every parameter of
  params.yaml, flattened (`train_tf.learning_rate`...); a summary metric per head
  (`<head>.accuracy`...); the train and test sets as dataset inputs (digest of their split
  manifest rows, source data.source); tags with the provenance of the result: git commit and
  dirty flag, the dvc.lock hashes of the data and the backbone, the dataset manifest hash, the DVC
  experiment name (`dvc exp run` sets DVC_EXP_NAME); artifacts params.yaml, dvc.lock and
  metrics/comparison.md.
- one nested run per model of the result, `<result>/<model>`: params.yaml `models` (tf, keras,
  sklearn) then `finetune_models` (finetune_tf, finetune_keras; imgclf.registry.pipeline_models).
  The same params, datasets and tags, the model's training settings as `train.*` params (a
  fine-tuned model also `base`, the head it started from); metrics `test.*` (accuracy, its CI,
  log loss...), `train.*` (validation results), `training_seconds`, and the curves `curve.*`
  at step = training images seen (one x-axis for every head; `curve.epoch` gives epochs); the
  per-class scores as a table (evaluation/per_class.json), the confusion matrix, the
  misclassified contact sheet, a classification report and labels.txt. A fine-tuned model's
  run also has its per-block gradient norms as metrics `gradient_norm.<block>` (step = epoch;
  from the gradient_norm_<block> columns of its curve) and its TensorBoard event folder
  (<paths.tensorboard>/<model>) as the artifact folder `tensorboard/`. Every servable model's
  run also logs its end-to-end model (image file in, label and probabilities out;
  `imgclf.end_to_end`) in `track.registered_models.<model>`: a new version with a description
  only when the model is new (same weights, labels, backbone and code = the same version), and
  the alias @champion on the version of the latest tracked result that passes
  evaluate.min_accuracy.

The store. Without MLFLOW_TRACKING_URI, runs go to `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts/`, where <root> is the ORIGINAL repository: `dvc exp run --temp/--queue` run
the stage in a fresh git repo under `.dvc/tmp/exps/`, and DVC passes the original root in the
DVC_ROOT variable (dvc/repo/experiments/queue/base.py), so every run of every kind lands in the
one store that `make ui` shows. With MLFLOW_TRACKING_URI (and the usual MLFLOW_* variables) set,
a team tracking server is used unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.parse
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from imgclf.config import repo_root
from imgclf.downloads import unreachable
from imgclf.errors import ParamsError, UserError
from imgclf.fileio import read_csv, read_json, read_metrics, sha256_file
from imgclf.images import DEFAULT_MAX_PIXELS
from imgclf.layout import Layout
from imgclf.params import DataParams, EvaluateParams, IngestParams, TrackParams
from imgclf.registry import MODELS, get_model, input_precision, model_names, pipeline_models

HEADS = tuple(MODELS)  # the registered models; a result's child runs: pipeline_models(params)
MODEL_HEADS = tuple(model_names(servable=True))  # an end-to-end model in the registry each
CURVE_HEADS = tuple(model_names(has_curve=True))  # overlaid in the parent run's curve links
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# The stages whose dvc.lock output hashes identify the data and the backbone of a result.
PROVENANCE_STAGES = ("ingest", "split", "backbone", "bottlenecks")
_MAX_TAG = 5000  # MLflow's tag value limit is 8000; stay well inside it
_MAX_PARAM = 6000


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    registry_uri: str
    artifact_root: str | None  # for new experiments; None = the server decides
    is_default: bool  # the embedded sqlite store at the repository root

    @property
    def db(self) -> Path | None:
        """The default store's SQLite file (<root>/mlflow.db); None for any other store."""
        return Path(self.tracking_uri.removeprefix("sqlite:///")) if self.is_default else None


def resolve_store(root: str | Path | None = None, tracking_uri: str | None = None) -> Store:
    """Where runs go: `tracking_uri`, else MLFLOW_TRACKING_URI, else the embedded store at the
    original repository root (sqlite:///<root>/mlflow.db + <root>/mlartifacts)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
        return Store(uri, registry, None, is_default=False)
    base = Path(root).resolve() if root is not None else repo_root()
    uri = f"sqlite:///{base / DB_FILE}"
    return Store(uri, uri, (base / ARTIFACTS_DIR).as_uri(), is_default=True)


class TrackingStoreError(UserError):
    """The MLflow store cannot be used as it is: a damaged or outdated database, a server that
    does not answer, a deleted experiment."""


def configure_store(root: str | Path | None = None, tracking_uri: str | None = None) -> Store:
    """Point the `mlflow` module at the store (see `resolve_store`) and return it; raises
    TrackingStoreError when the store cannot be used."""

    store = resolve_store(root, tracking_uri)
    check_store(store)
    use_store(store)
    return store


def check_store(store: Store) -> None:
    """Raise TrackingStoreError unless `store` can be used: its tracking server answers, or
    the project's SQLite file opens (it is created when there is none)."""
    if store.is_default:
        _init_sqlite_store(store)
    else:
        check_server(store.tracking_uri)


def open_existing_store(root: str | Path | None = None) -> Store:
    """The store (see `resolve_store`), checked for reading what the pipeline registered: the
    project's mlflow.db must exist (reading never creates one) and open, or the tracking
    server must answer; raises TrackingStoreError."""
    store = resolve_store(root)
    if store.db is not None and not store.db.is_file():
        raise TrackingStoreError(
            f"no MLflow store at {store.db}: run the pipeline first (make run) or set "
            "MLFLOW_TRACKING_URI to the tracking server that has the model"
        )
    check_store(store)
    return store


def is_server(uri: str) -> bool:
    """Whether a tracking URI names a tracking server (http or https), not a database."""
    return urllib.parse.urlsplit(uri).scheme.lower() in ("http", "https")


def check_server(uri: str) -> None:
    """Raise TrackingStoreError unless the tracking server at an http(s) `uri` answers.
    MLflow's own client retries a server that is not there for about four minutes, without a
    word, then fails with a traceback: one request first says it in seconds."""
    if not is_server(uri):
        return
    why = unreachable(uri.rstrip("/") + "/health")
    if why is not None:
        raise TrackingStoreError(
            f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: {why}. "
            "Start it, or unset MLFLOW_TRACKING_URI to log to the project's own store "
            "(mlflow.db, which make ui shows)."
        )


def use_store(store: Store) -> None:
    """mlflow.set_tracking_uri / set_registry_uri, without the registry's environment variable
    they leave behind: mlflow also writes MLFLOW_REGISTRY_URI, and a later `resolve_store` in
    this process would take it for the user's and read another store's registry."""
    import mlflow

    user_registry = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.registry_uri)
    if user_registry is None:
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


def _init_sqlite_store(store: Store) -> None:
    # The first client to open a new database creates the "Default" experiment with an artifact
    # root of ./mlruns relative to the CURRENT directory (a temp exp copy, say). Creating the
    # store here first gives it <root>/mlartifacts, the folder `make ui` serves.
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.exc import SQLAlchemyError

    db = store.db
    try:
        SqlAlchemyStore(store.tracking_uri, store.artifact_root)
    except MlflowException as e:  # an outdated schema: MLflow's message says how to upgrade
        raise TrackingStoreError(f"{db}: {' '.join(e.message.split())}") from None
    except SQLAlchemyError as e:
        cause = " ".join(str(getattr(e, "orig", None) or e).split())
        raise TrackingStoreError(
            f"{db}: MLflow cannot open this store ({cause}). The file holds the project's runs "
            "and registered models: restore it from a backup, or move it aside (mv "
            f"{db} {db}.damaged) and the next run of the track stage starts a new one."
        ) from None


def get_or_create_experiment(name: str, store: Store) -> str:
    """The experiment id for this pipeline: MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME when
    set, else `name` (track.experiment), created under the store's artifact root."""
    from mlflow import MlflowClient

    client = MlflowClient(store.tracking_uri, store.registry_uri)
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingStoreError(
                f"MLflow experiment {name!r} is deleted (in the trash) in {store.tracking_uri}: "
                f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                "or set track.experiment to another name."
            )
        return exp.experiment_id
    try:
        # The kind the UI uses for an experiment of trained models (its GenAI view otherwise).
        return client.create_experiment(
            name,
            artifact_location=store.artifact_root,
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except Exception:
        # Another run (a parallel `dvc queue start -j 2`) created it between our two calls.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------- provenance


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


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_info(workdir: str | Path, ignore: Iterable[str] = ()) -> dict[str, str]:
    """Commit, branch and dirty flag of the checkout the stage runs in.

    Dirty = a git-tracked file differs from the commit, other than dvc.lock and the `ignore`
    prefixes (the metrics the pipeline itself rewrites): a repro always changes those, and they
    are what this run records anyway. params.yaml changed by `dvc exp run -S` does count.
    """
    workdir = Path(workdir)
    commit = _git(workdir, "rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "none", "git.dirty": "unknown"}
    # Staged or not, every tracked file that differs from HEAD.
    diff = _git(workdir, "diff", "--name-only", "HEAD") or ""
    skip = ("dvc.lock", *ignore)
    changed = sorted(f for f in diff.splitlines() if f and not f.startswith(skip))
    info = {"git.commit": commit, "git.dirty": str(bool(changed)).lower()}
    if changed:
        info["git.changed_files"] = " ".join(changed)[:_MAX_TAG]
    branch = _git(workdir, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        info["git.branch"] = branch
    return info


def dvc_lock_hashes(
    lock_path: str | Path, stages: Iterable[str] = PROVENANCE_STAGES
) -> dict[str, str]:
    """`dvc.<stage>.<out path>` -> md5 of every output of `stages` in dvc.lock (DVC writes each
    stage's entry as soon as the stage finishes, so the earlier stages are there when `track`
    runs). Missing lock or stage: no tags, not an error (a partly run pipeline)."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    tags = {}
    for stage in stages:
        for out in (lock.get("stages", {}).get(stage) or {}).get("outs", []) or []:
            digest = out.get("md5") or out.get("hash") or out.get("etag")
            if out.get("path") and digest:
                tags[f"dvc.{stage}.{out['path'].rstrip('/')}"] = str(digest)
    return tags


def provenance_tags(params: Mapping[str, Any], workdir: str | Path) -> dict[str, str]:
    """Git, DVC and data tags shared by the parent and child runs."""
    workdir = Path(workdir)
    paths = params["paths"]
    tags = git_info(workdir, ignore=(f"{paths['metrics']}/",))
    tags.update(dvc_lock_hashes(workdir / "dvc.lock"))
    for key, path in (
        ("data.manifest_sha256", workdir / paths["manifest"]),
        ("data.split_manifest_sha256", workdir / paths["split"] / "manifest.csv"),
    ):
        if path.is_file():
            tags[key] = sha256_file(path)
    backbone_json = workdir / paths["backbone"] / "backbone.json"
    if backbone_json.is_file():
        info = read_json(backbone_json)
        for key in ("sha256", "weights", "preprocessing"):
            if key in info:
                tags[f"backbone.{key}"] = str(info[key])
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
        ("DVC_STAGE", "dvc.stage"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags["data.source"] = str(params.get("data", {}).get("source", ""))[:_MAX_TAG]
    # Where the stage ran: the repository, or a `dvc exp run --temp/--queue` copy of it.
    tags["imgclf.workdir"] = str(workdir.resolve())[:_MAX_TAG]
    return tags


# --------------------------------------------------------------------------- reports


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


def dataset_name(source: str) -> str:
    """A name for the data of `data.source`: the last part of its path or URL without the
    archive/export suffix (flower_photos.tgz -> flower_photos), safe for a registered model."""
    import re
    from urllib.parse import urlsplit

    text = str(source).rstrip("/\\")
    if "://" in text:
        text = urlsplit(text).path.rstrip("/")
    name = re.split(r"[/\\]", text)[-1] if text else ""
    for suffix in (".tar.gz", ".tgz", ".zip", ".jsonl", ".json", ".tar"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    return name or "images"


def registered_model_names(registered_models: Mapping[str, str], source: str) -> dict[str, str]:
    """track.registered_models with `{dataset}` filled in from data.source; a servable model
    it does not name is registered as `{dataset}-<model>`."""
    if unknown := [name for name in registered_models if name not in MODEL_HEADS]:
        raise ParamsError(
            f"track.registered_models.{unknown[0]}",
            expected="a servable model of imgclf/registry.py: " + ", ".join(MODEL_HEADS),
            found=f"{len(unknown)} unknown model(s): " + ", ".join(unknown),
            todo="Check the spelling.",
        )
    templates = {head: f"{{dataset}}-{head}" for head in MODEL_HEADS}
    templates.update(registered_models)
    return {head: str(t).format(dataset=dataset_name(source)) for head, t in templates.items()}


def logged_models(log_models: bool | Sequence[str], heads: Sequence[str]) -> list[str]:
    """The models of this pipeline (`heads`) whose end-to-end model track logs and registers:
    track.log_models true (every servable one), false (none) or a list, each of which must
    be a servable model of the pipeline."""
    servable = [head for head in heads if head in MODEL_HEADS]
    if isinstance(log_models, bool):
        return servable if log_models else []
    if unknown := [name for name in log_models if name not in servable]:
        raise ParamsError(
            "track.log_models",
            expected="true, false or a list of the pipeline's servable models: "
            + ", ".join(servable),
            found=f"{len(unknown)} other model(s): " + ", ".join(unknown),
            todo="Check the spelling, or add the model to `models:`/`finetune_models:`.",
        )
    return list(log_models)


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


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ResultFiles:
    """Where a pipeline result's files are, from params.yaml `paths` (relative to `workdir`)."""

    workdir: Path
    layout: Layout

    @classmethod
    def from_params(cls, params: Mapping[str, Any], workdir: str | Path) -> ResultFiles:
        return cls(workdir=Path(workdir), layout=Layout.from_params(params, workdir))

    @property
    def models(self) -> Path:
        return self.layout.models

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


def _log_metrics(client: Any, run_id: str, items: Iterable[tuple[str, float, int]]) -> None:
    """log_batch in chunks of MLflow's 1,000-metric limit."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for key, value, step in items]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, param_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _redact(uri: str) -> str:
    """The URI without a password (the summary file is committed to git)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _run_name(tags: Mapping[str, str]) -> str:
    if tags.get("dvc.exp_name"):
        return tags["dvc.exp_name"]
    commit = tags.get("git.commit", "none")[:7]
    return f"repro-{commit}{'-dirty' if tags.get('git.dirty') == 'true' else ''}"


def child_run_name(parent_name: str, head: str) -> str:
    """`<result>/<head>`: which result a head run belongs to, in every table and chart legend."""
    return f"{parent_name}/{head}"


def track_pipeline(
    params: Mapping[str, Any],
    *,
    workdir: str | Path = ".",
    tracking_uri: str | None = None,
    root: str | Path | None = None,
    log_models: bool | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Record the pipeline result in `workdir` as one parent run + one child run per head.

    Returns the summary that the stage writes to metrics/mlflow_run.json (run ids, registered
    model versions, store). `root` is where the default store lives (default: `repo_root()`).
    """
    import mlflow
    from mlflow import MlflowClient

    workdir = Path(workdir).resolve()
    track = TrackParams.from_params(params)
    source = DataParams.from_params(params).source
    registered_models = registered_model_names(track.registered_models, source)
    files = ResultFiles.from_params(params, workdir)
    heads = pipeline_models(params)
    logged = logged_models(track.log_models if log_models is None else log_models, heads)
    evaluations = {
        head: read_json(p) for head in heads if (p := files.layout.evaluation(head)).is_file()
    }
    missing = [h for h in heads if h not in evaluations]
    if missing:
        raise FileNotFoundError(
            f"no metrics/evaluate/<model>.json for {missing} under {files.metrics}: run the "
            "evaluate stage first (dvc repro evaluate)."
        )
    # Only now touch the store: a missing result must not leave an empty database behind.
    store = configure_store(root, tracking_uri)
    experiment_id = get_or_create_experiment(track.experiment, store)
    client = MlflowClient(store.tracking_uri, store.registry_uri)
    flat_params = flatten(params)
    tags = provenance_tags(params, workdir)
    data_name = dataset_name(source)
    split_manifest = workdir / params["paths"]["split"] / "manifest.csv"
    datasets = (
        {
            subset: subset_dataset(split_manifest, subset, source, f"{data_name}-{subset}")
            for subset in ("train", "test")
        }
        if split_manifest.is_file()
        else {}
    )
    models = EndToEndModels(
        files,
        precision="float32",  # every model of `heads` has its own, just below
        precisions={head: input_precision(head, params) for head in heads},
        registered_models=registered_models,
        min_accuracy=EvaluateParams.from_params(params).min_accuracy,
        data_description=_data_description(source, datasets, tags),
        max_image_pixels=IngestParams.from_params(params).max_image_pixels,
    )

    summary: dict[str, Any] = {
        "tracking_uri": _redact(store.tracking_uri),
        "experiment_id": experiment_id,
        "heads": {},
    }
    parent_tags = {**tags, "imgclf.run_kind": "pipeline"}
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=_run_name(tags), tags=parent_tags
    ) as parent:
        parent_id = parent.info.run_id
        summary["run_id"] = parent_id
        summary["run_name"] = parent.info.run_name
        _log_params(client, parent_id, flat_params)
        if datasets:
            log_datasets(client, parent_id, datasets)
        _log_metrics(
            client,
            parent_id,
            [
                (f"{head}.{key}", value, 0)
                for head, ev in evaluations.items()
                for key, value in numeric_leaves(
                    {k: v for k, v in ev.items() if k != "per_class"}
                ).items()
            ],
        )
        for path in (
            workdir / "params.yaml",
            workdir / "dvc.lock",
            files.metrics / "comparison.md",
            files.backbone / "backbone.json",
        ):
            if path.is_file():
                client.log_artifact(parent_id, str(path))
        _log_litert(client, parent_id, files.layout, params.get("litert", {}).get("models", []),
                    logged=logged)  # fmt: skip
        layout = files.layout
        for path in (layout.label_issues(), layout.label_issues(".png"), layout.audit_metrics):
            if path.is_file():
                client.log_artifact(parent_id, str(path), "label_audit")
        for head in heads:
            summary["heads"][head] = _track_head(
                head,
                run_name=child_run_name(parent.info.run_name, head),
                files=files,
                evaluation=evaluations[head],
                flat_params=flat_params,
                tags=tags,
                datasets=datasets,
                experiment_id=experiment_id,
                client=client,
                models=models if head in logged else None,
            )
        curve_runs = [summary["heads"][h]["run_id"] for h in CURVE_HEADS if h in summary["heads"]]
        summary["curves_links"] = {
            what: curves_link(
                experiment_id, curve_runs, [f"curve.val_{what}", f"curve.train_{what}"]
            )
            for what in ("loss", "accuracy")
        }
        # The run's description in the UI: one click to the overlaid TF and Keras curves.
        client.set_tag(
            parent_id,
            "mlflow.note.content",
            "TF and Keras training curves of this result, on one x-axis (training images seen):"
            f" [loss]({summary['curves_links']['loss']}),"
            f" [accuracy]({summary['curves_links']['accuracy']}).",
        )
    return summary


def _log_litert(
    client: Any, run_id: str, layout: Layout, models: Iterable[str], *, logged: Collection[str]
) -> None:
    """The export@<model> stages' results for `models` (litert.models), when they ran: each
    metrics/litert/<model>.json as `litert.<file>.<key>` metrics, and with its .md under
    `litert/`; the .tflite files (+ labels, sidecars) there too for the models in `logged`
    (track.log_models: they are models, ~150 MB for one model's three files). A model no
    longer in the list may have left its files behind (DVC keeps the outputs of a stage that is
    gone): not logged."""
    for model in models:
        report = layout.litert_metrics(model)
        if not report.is_file():
            continue
        files = read_json(report).get("files", {})
        _log_metrics(
            client, run_id, [(f"litert.{k}", v, 0) for k, v in numeric_leaves(files).items()]
        )
        client.log_artifact(run_id, str(report), "litert")
        if layout.litert_md(model).is_file():
            client.log_artifact(run_id, str(layout.litert_md(model)), "litert")
        if model in logged and layout.litert_dir(model).is_dir():
            client.log_artifacts(run_id, str(layout.litert_dir(model)), "litert")


def curves_link(experiment_id: str, run_ids: Iterable[str], keys: list[str]) -> str:
    """The UI's metric page (a hash route, relative to the UI's address) drawing `keys` of
    `run_ids` on one chart, x = step (= training images seen for the curve.* metrics)."""
    from urllib.parse import quote

    compact = {"separators": (",", ":")}
    query = {
        "runs": json.dumps(list(run_ids), **compact),
        "metric": json.dumps(keys[0]),
        "experiments": json.dumps([str(experiment_id)]),
        "plot_metric_keys": json.dumps(keys, **compact),
        "plot_layout": "{}",
        "x_axis": "step",
        "y_axis_scale": "linear",
        "line_smoothness": "1",
        "show_point": "false",
        "deselected_curves": "[]",
        "last_linear_y_axis_range": "[]",
    }
    # Every value percent-encoded: a raw quote would end the link in the run's Markdown note.
    return "#/metric?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())


def _data_description(source: str, datasets: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    sizes = ", ".join(f"{len(ds.df)} {subset}" for subset, ds in datasets.items())
    digest = tags.get("data.manifest_sha256", "")[:16]
    return f"{source} ({sizes} images; manifest sha256 {digest}...)" if sizes else source


def _track_head(
    head: str,
    *,
    run_name: str,
    files: ResultFiles,
    evaluation: Mapping[str, Any],
    flat_params: Mapping[str, Any],
    tags: Mapping[str, str],
    datasets: Mapping[str, Any],
    experiment_id: str,
    client: Any,
    models: EndToEndModels | None,
) -> dict[str, Any]:
    import mlflow

    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        nested=True,
        tags={**tags, "imgclf.run_kind": "head", "imgclf.head": head},
    ) as run:
        run_id = run.info.run_id
        if datasets:
            log_datasets(client, run_id, datasets)
        run_params: dict[str, Any] = {**flat_params, "head": head}
        spec = MODELS.get(head)
        if spec is not None and spec.base is not None:
            run_params["base"] = spec.base  # the head it was fine-tuned from
        metrics = [
            (f"test.{k}", v, 0)
            for k, v in numeric_leaves(
                {k: v for k, v in evaluation.items() if k != "per_class"}
            ).items()
        ]
        train_json = files.layout.train_metrics(head)
        # The names and flags are in the .info.json part, the precision a fine-tune ran at too
        # (its param may say auto).
        train = read_metrics(train_json) if train_json.is_file() else {}
        train_params, train_metrics = split_train_summary(train)
        run_params.update(train_params)
        metrics += [(k, v, 0) for k, v in train_metrics.items()]
        curve_csv = files.layout.curve(head)
        curve = (
            curve_metrics(curve_csv, int(train.get("n_train", 0)))
            if curve_csv.is_file() and train.get("n_train")
            else []
        )
        _log_params(client, run_id, run_params)
        _log_metrics(client, run_id, metrics + curve)
        for path, folder in files.head_artifacts(head):
            if path.is_file():
                client.log_artifact(run_id, str(path), folder or None)
        events = files.tensorboard_dir(head)
        if events is not None:
            # `tensorboard --logdir <downloaded tensorboard/>` shows this run's training.
            client.log_artifacts(run_id, str(events), "tensorboard")
        client.log_text(
            run_id,
            classification_report(evaluation),
            "evaluation/classification_report.txt",
        )
        if evaluation.get("per_class"):
            mlflow.log_table(per_class_table(evaluation), "evaluation/per_class.json", run_id)
        result: dict[str, Any] = {"run_id": run_id, "curve_points": len(curve)}
        if models is not None:
            result.update(_log_end_to_end(head, models, client, run, tags, evaluation))
    return result


HEAD_DESCRIPTIONS = {name: spec.description for name, spec in MODELS.items()}
CHAMPION = "champion"


@dataclass
class EndToEndModels:
    """The end-to-end models of one result (`imgclf.end_to_end`), for the tf and keras runs:
    the backbone is hashed (for the keys) and loaded (for an export) at most once for both."""

    files: ResultFiles
    precision: str  # bottlenecks.precision: the backbone computes what the heads were trained on
    registered_models: Mapping[str, str]  # head -> registered model name
    min_accuracy: float = 0.0  # evaluate.min_accuracy: the gate a @champion must pass
    data_description: str = ""
    # Per model, when it differs from `precision`: activations.precision for a fine-tuned one.
    precisions: Mapping[str, str] | None = None
    # ingest.max_image_pixels: the served model refuses what ingest would have refused.
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    def precision_of(self, head: str) -> str:
        return (self.precisions or {}).get(head, self.precision)

    def registered_name(self, head: str) -> str:
        return self.registered_models[head]

    @cached_property
    def _shared_files(self) -> bytes:
        from imgclf import end_to_end, images, inception

        # The code that builds the model (decoding and preprocessing included) is part of
        # what it is; of the backbone folder, its weights and how they are read.
        code = (Path(end_to_end.__file__), Path(images.__file__), Path(inception.__file__))
        return _files_digest(*code, self.files.backbone)

    @cached_property
    def _builder(self) -> Any:
        from imgclf.end_to_end import Builder

        return Builder(self.files.backbone)

    def key(self, head: str) -> str:
        """What determines the end-to-end model of `head`: the backbone's files, the head's
        weights (their values, not the bytes of the files that hold them), labels and code,
        the precision, the served pixel cap and the code that assembles them. The same key is
        the same model."""
        from imgclf.heads import head_module

        head_dir = self.files.head_dir(head)
        digest = hashlib.sha256(
            f"{head}:{self.precision_of(head)}:{self.max_image_pixels}".encode()
        )
        digest.update(self._shared_files)
        # finetune.json: a fine-tuned model's cut and test-time flip (absent for a head).
        digest.update(
            _files_digest(
                Path(head_module(head).__file__),
                head_dir / "labels.txt",
                head_dir / "finetune.json",
            )
        )
        digest.update(get_model(head).function("weights_digest")(head_dir))
        return digest.hexdigest()

    def build(self, head: str) -> Any:
        return self._builder(self.files.head_dir(head), head, self.precision_of(head))


def weights_digest(head_dir: Path, head: str) -> bytes:
    """sha256 over the names, shapes, dtypes and values of a trained head's weights (the
    spec's weights_digest)."""
    return get_model(head).function("weights_digest")(head_dir)


def _files_digest(*paths: Path) -> bytes:
    """Name + sha256 of each of `paths` that is a file and of every file under those that are
    folders (in path order)."""
    out = b""
    for root in paths:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                out += path.name.encode() + sha256_file(path).encode()
    return out


def _log_end_to_end(
    head: str,
    models: EndToEndModels,
    client: Any,
    run: Any,
    tags: Mapping[str, str],
    evaluation: Mapping[str, Any],
) -> dict[str, Any]:
    """Log the end-to-end model of `head` in `run` and register it, unless the same model (same
    key) is registered already: then that version is this result's, and nothing new is made."""
    import mlflow

    from imgclf import end_to_end

    name = models.registered_name(head)
    key = models.key(head)
    existing = _version_with_key(client, name, key)
    new_version = existing is None
    if existing is not None:
        version, model_uri = str(existing.version), existing.source
        print(
            f"track: {head} model unchanged, already {name!r} version {version}",
            file=sys.stderr,
        )
    else:
        model_uri = _logged_model_with_key(client, run.info.experiment_id, key)
        if model_uri:
            # Same model logged for another registered name (track.registered_models changed):
            # register it, without exporting 90 MB anew.
            version = str(mlflow.register_model(model_uri, name).version)
        else:
            model = models.build(head)
            print(f"track: logging the end-to-end {head} model as {name!r}...", file=sys.stderr)
            info = end_to_end.log_model(
                model, registered_model_name=name, max_image_pixels=models.max_image_pixels
            )
            model_uri, version = info.model_uri, str(info.registered_model_version)
        client.set_model_version_tag(name, version, "imgclf.model_key", key)
        for tag in ("git.commit", "dvc.exp_name", "backbone.sha256", "data.manifest_sha256"):
            if tag in tags:
                client.set_model_version_tag(name, version, tag, tags[tag])
        client.set_model_version_tag(name, version, "head", head)
    client.set_tag(run.info.run_id, "imgclf.model_key", key)
    client.set_tag(run.info.run_id, "imgclf.model_uri", model_uri)
    client.set_tag(run.info.run_id, "imgclf.registered_model", f"{name}/{version}")
    accuracy = float(evaluation.get("accuracy", 0.0))
    passed = accuracy >= models.min_accuracy
    if new_version:
        client.set_model_version_tag(name, version, "test.accuracy", f"{accuracy:.6f}")
        client.set_model_version_tag(name, version, "gate", "passed" if passed else "failed")
        client.update_model_version(
            name, version, description=_version_description(head, evaluation, models, tags, run)
        )
    _describe_registered_model(client, name, head, models)
    champion = _update_champion(client, name, version, passed)
    return {
        "model_uri": model_uri,
        "registered_model": name,
        "registered_version": version,
        "new_version": new_version,
        "champion": champion,
    }


def _version_with_key(client: Any, name: str, key: str) -> Any:
    """The registered version of `name` whose model has `key`, if any (oldest first)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if (v.tags or {}).get("imgclf.model_key") == key]
    return min(same, key=lambda v: int(v.version)) if same else None


def _version_description(
    head: str,
    evaluation: Mapping[str, Any],
    models: EndToEndModels,
    tags: Mapping[str, str],
    run: Any,
) -> str:
    accuracy = float(evaluation.get("accuracy", 0.0))
    ci = (
        f" (95% CI {evaluation['ci_low']:.4f}-{evaluation['ci_high']:.4f})"
        if "ci_low" in evaluation and "ci_high" in evaluation
        else ""
    )
    gate = "passes" if accuracy >= models.min_accuracy else "FAILS"
    commit = tags.get("git.commit", "none")[:12]
    return (
        f"Test accuracy {accuracy:.4f}{ci} on {evaluation.get('n_test', '?')} held-out images; "
        f"{gate} the gate evaluate.min_accuracy = {models.min_accuracy}. "
        f"Data: {models.data_description}. Head: {HEAD_DESCRIPTIONS.get(head, head)}. "
        f"Run {run.info.run_name} ({run.info.run_id}), git commit {commit}."
    )


def _describe_registered_model(client: Any, name: str, head: str, models: EndToEndModels) -> None:
    from imgclf.heads.common import read_labels

    labels = read_labels(models.files.head_dir(head))
    shown = ", ".join(labels[:20]) + (f" and {len(labels) - 20} more" if len(labels) > 20 else "")
    spec = MODELS.get(head)
    backbone = (
        "Inception V3 (ImageNet weights, its top blocks fine-tuned)"
        if spec is not None and spec.fine_tuned
        else "Inception V3 (frozen, ImageNet weights)"
    )
    description = (
        f"Image classifier: {backbone} + {HEAD_DESCRIPTIONS[head]}, "
        f"trained by the tf-or-keras pipeline (imgclf). Input: image files (JPEG, PNG...; "
        f"base64 in JSON, column `image`); output per image: label, probability and the "
        f"probabilities of the {len(labels)} classes: {shown}. Data: {models.data_description}. "
        f"Serve models:/{name}@{CHAMPION}: the model of the latest tracked result that passes "
        f"evaluate.min_accuracy."
    )
    client.update_registered_model(name, description=description)


def _update_champion(client: Any, name: str, version: str, passed: bool) -> str:
    """Point @champion at `version`, the model of the result being tracked, when it passes the
    gate; one that fails leaves the alias where it was. Returns the champion's version ("" for
    none). Not the best test accuracy over the versions: that would choose the served model on
    the test set, and versions from other split seeds or data were scored on other images."""
    from mlflow.exceptions import MlflowException

    if passed:
        try:
            current = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            current = ""
        if current != version:
            client.set_registered_model_alias(name, CHAMPION, version)
            print(f"track: {name}@{CHAMPION} is now version {version}", file=sys.stderr)
        return version
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return ""


def _logged_model_with_key(client: Any, experiment_id: str, key: str) -> str | None:
    """The model URI an earlier head run logged for the same `EndToEndModels.key`, if any."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`imgclf.model_key` = '{key}'", max_results=1
    )
    return runs[0].data.tags.get("imgclf.model_uri") if runs else None


# --------------------------------------------------------------------------- the UI


def ui_url(
    base_url: str = "http://127.0.0.1:5000",
    experiment: str = "tf-or-keras",
    root: str | Path | None = None,
) -> str:
    """The link that opens the experiment's runs in the UI's model-training view, on
    `base_url`, or on the tracking server's own UI when MLFLOW_TRACKING_URI names one. MLflow
    3's UI opens an experiment in its GenAI view (traces) unless the URL asks for
    workflowType=machine_learning; no server setting changes that."""
    store = resolve_store(root)
    base = (store.tracking_uri if is_server(store.tracking_uri) else base_url).rstrip("/")
    db = store.db
    experiment_id = None
    if db is None or db.is_file():
        from mlflow import MlflowClient

        check_store(store)  # a damaged mlflow.db, a server that does not answer: named
        exp = MlflowClient(store.tracking_uri).get_experiment_by_name(experiment)
        experiment_id = exp.experiment_id if exp is not None else None
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def check_port_free(port: int, instead: str) -> None:
    """Raise UserError when something already listens on 127.0.0.1:`port` (an earlier
    `make ui` or `make serve`, say): MLflow would print the link, then fail to bind."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise UserError(
                f"port {port} of 127.0.0.1 is in use (an earlier make ui or make serve?): stop "
                f"what listens there, or use another port: {instead}"
            ) from None


def run_ui(port: int, experiment: str, root: str | Path | None = None) -> None:
    """`make ui`: the UI of the store track logs to (mlflow.db, or the database
    MLFLOW_TRACKING_URI names) on 127.0.0.1:`port`, after printing the link that opens the
    experiment's runs. A tracking server has a UI of its own: only its link is printed."""
    store = resolve_store(root)
    served_here = not is_server(store.tracking_uri)
    if served_here:
        check_port_free(port, f"make ui UI_PORT={port + 1}")
    print(f"MLflow UI: open {ui_url(f'http://127.0.0.1:{port}', experiment, root)}")
    if not served_here:
        print("(the tracking server's own UI: MLFLOW_TRACKING_URI)")
        return
    print(f"(store: {store.tracking_uri})", flush=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow), "ui", "--backend-store-uri", store.tracking_uri,
            "--default-artifact-root", store.artifact_root or "./mlartifacts",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    # MLflow 3's UI starts seven huey consumers for its GenAI jobs unless told not to; this
    # project has none, and they outlive a SIGTERM of the UI.
    os.execve(mlflow, argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


SERVED_BY_DEFAULT = "finetune_keras"


def serve_uri(model: str = "", root: str | Path | None = None) -> str:
    """The model URI `make serve` serves: `model`, or by default the @champion of this
    project's registered finetune_keras (its name follows data.source). A models:/ URI is
    checked against the registry first: one that names nothing raises TrackingStoreError
    listing what is registered (MLflow's server would start, then fail with a traceback)."""
    from imgclf.config import load_params

    if not model:
        params = load_params()
        source = DataParams.from_params(params).source
        names = registered_model_names(TrackParams.from_params(params).registered_models, source)
        model = f"models:/{names[SERVED_BY_DEFAULT]}@{CHAMPION}"
    if not model.startswith("models:/"):
        return model
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = open_existing_store(root)
    client = MlflowClient(store.tracking_uri, store.registry_uri)
    name, _, alias = model.removeprefix("models:/").partition("@")
    name, _, version = name.partition("/")
    try:
        client.get_registered_model(name)
    except MlflowException:
        what = f"registered model {name!r}"
    else:
        try:
            if alias:
                client.get_model_version_by_alias(name, alias)
            elif version.isdigit():  # not /latest or a stage name: MLflow resolves those
                client.get_model_version(name, version)
            return model
        except MlflowException:
            what = f"alias @{alias} of {name!r}" if alias else f"version {version} of {name!r}"
    registered = [
        m.name + "".join(f" @{a}" for a in sorted(m.aliases or {}))
        for m in client.search_registered_models()
    ]
    listing = "; ".join(sorted(registered)) or "none: run the pipeline first (make run)"
    raise TrackingStoreError(
        f"{model}: no {what} in {store.tracking_uri}. Registered: {listing}. Serve one with "
        "make serve MODEL=models:/<name>@champion (or /<version>)."
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m imgclf.tracking ui --port P`: `run_ui` for track.experiment;
    `serve-uri [MODEL] --port P`: print `serve_uri(MODEL)`, once the port is free."""
    import argparse

    from imgclf.config import load_params

    parser = argparse.ArgumentParser(prog="python -m imgclf.tracking")
    parser.add_argument("command", choices=["ui", "serve-uri"])
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve-uri":
            uri = serve_uri(args.model)
            check_port_free(args.port, f"make serve SERVE_PORT={args.port + 1}")
            print(uri)
            return
        try:
            experiment = load_params()["track"]["experiment"]
        except (FileNotFoundError, KeyError, TypeError):
            experiment = "tf-or-keras"
        run_ui(args.port, experiment)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
