"""The end-to-end models of a result in MLflow's model registry: their registered names, one
version per distinct model (the same weights, labels, backbone and code are the same
version), each version's description and tags, and the alias @champion."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from imgclf.errors import ParamsError, first_few
from imgclf.fileio import sha256_file
from imgclf.images import DEFAULT_MAX_PIXELS
from imgclf.registry import MODELS, get_model, model_names
from imgclf.tracking.contents import ResultFiles

MODEL_HEADS = tuple(model_names(servable=True))  # an end-to-end model in the registry each


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


def _files_digest(*paths: Path) -> bytes:
    """Name + sha256 of each of `paths` that is a file and of every file under those that are
    folders (in path order)."""
    out = b""
    for root in paths:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                out += path.name.encode() + sha256_file(path).encode()
    return out


def log_end_to_end(
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
    champion = update_champion(client, name, version, passed)
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
    shown = first_few(labels, 20)
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


def update_champion(client: Any, name: str, version: str, passed: bool) -> str:
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
