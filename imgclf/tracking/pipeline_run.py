"""The track stage's work: a pipeline result recorded as MLflow runs (see `track_pipeline`).

What a run records:

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
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from imgclf.fileio import read_json, read_metrics
from imgclf.layout import Layout
from imgclf.params import DataParams, EvaluateParams, IngestParams, TrackParams
from imgclf.registry import MODELS, input_precision, model_names, pipeline_models
from imgclf.tracking.contents import (
    ResultFiles,
    classification_report,
    curve_metrics,
    flatten,
    log_datasets,
    numeric_leaves,
    param_value,
    per_class_table,
    split_train_summary,
    subset_dataset,
)
from imgclf.tracking.provenance import provenance_tags
from imgclf.tracking.registered import (
    EndToEndModels,
    dataset_name,
    log_end_to_end,
    logged_models,
    registered_model_names,
)
from imgclf.tracking.store import configure_store, get_or_create_experiment

CURVE_HEADS = tuple(model_names(has_curve=True))  # overlaid in the parent run's curve links


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
            result.update(log_end_to_end(head, models, client, run, tags, evaluation))
    return result
