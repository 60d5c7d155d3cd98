"""Where every output of the pipeline lives, built from params.yaml `paths:`: every writer and
reader asks this object for a file's place, and dvc.yaml spells the same places with
`${paths.*}`. Per model `<name>`:

    <paths.models>/heads/<name>/                 the trained model (+ labels.txt)
    <paths.metrics>/train/<name>.json            training metrics (numbers; + .info.json)
    <paths.metrics>/curves/<name>.csv            training curve (header only without a curve)
    <paths.metrics>/evaluate/<name>.json         test metrics (numbers; + .info.json)
    <paths.metrics>/confusion/<name>.csv, .png   confusion matrix
    <paths.metrics>/misclassified/<name>.csv, .png
    <paths.tensorboard>/<name>/                  TensorBoard events (fine-tuned models)

the label audit's (imgclf/label_audit.py):

    <paths.metrics>/label_issues.csv, .png      training images whose label looks wrong
    <paths.metrics>/audit.json                  how many, per class

and, per model of `litert.models`, its export@<name> stage's LiteRT files (imgclf/litert.py):

    <paths.models>/litert/<name>/<name>-<precision>.tflite, .labels.txt, .json
    <paths.metrics>/litert/<name>.json, .md   their test metrics, and as a table

The same for heads and fine-tuned models (imgclf/registry.py). evaluate and track depend on
these folders, so a new head needs no edit of their dvc.yaml entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADS_DIR = "heads"
LITERT_DIR = "litert"


@dataclass(frozen=True)
class Layout:
    metrics: Path = Path("metrics")
    models: Path = Path("models")
    backbone: Path = Path("models/backbone")
    bottlenecks: Path = Path("data/bottlenecks")
    split: Path = Path("data/split")
    activations: Path = Path("data/activations")
    tensorboard: Path = Path("logs/tensorboard")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], workdir: str | Path = ".") -> Layout:
        paths, workdir = params["paths"], Path(workdir)
        return cls(
            metrics=workdir / paths["metrics"],
            models=workdir / paths["models"],
            backbone=workdir / paths["backbone"],
            bottlenecks=workdir / paths["bottlenecks"],
            split=workdir / paths["split"],
            activations=workdir / paths["activations"],
            tensorboard=workdir / paths["tensorboard"],
        )

    @classmethod
    def of(cls, *, metrics: str | Path = "metrics", models: str | Path = "models") -> Layout:
        """For callers that only know a metrics and/or a models folder."""
        return cls(metrics=Path(metrics), models=Path(models))

    @property
    def heads(self) -> Path:
        return self.models / HEADS_DIR

    @property
    def litert(self) -> Path:
        """Every exported model's folder (track logs it whole)."""
        return self.models / LITERT_DIR

    def litert_dir(self, name: str) -> Path:
        return self.litert / name

    @property
    def litert_reports(self) -> Path:
        """Every exported model's metrics and table."""
        return self.metrics / LITERT_DIR

    def litert_metrics(self, name: str) -> Path:
        return self.litert_reports / f"{name}.json"

    def litert_md(self, name: str) -> Path:
        return self.litert_reports / f"{name}.md"

    def model_dir(self, name: str) -> Path:
        return self.heads / name

    def tensorboard_dir(self, name: str) -> Path:
        return self.tensorboard / name

    def train_metrics(self, name: str) -> Path:
        return self.metrics / "train" / f"{name}.json"

    def curve(self, name: str) -> Path:
        return self.metrics / "curves" / f"{name}.csv"

    def evaluation(self, name: str) -> Path:
        return self.metrics / "evaluate" / f"{name}.json"

    def confusion(self, name: str, suffix: str = ".csv") -> Path:
        return self.metrics / "confusion" / f"{name}{suffix}"

    def misclassified(self, name: str, suffix: str = ".csv") -> Path:
        return self.metrics / "misclassified" / f"{name}{suffix}"

    def label_issues(self, suffix: str = ".csv") -> Path:
        """The label audit's list of training images whose label looks wrong (.csv, .png)."""
        return self.metrics / f"label_issues{suffix}"

    @property
    def audit_metrics(self) -> Path:
        return self.metrics / "audit.json"

    @property
    def comparison_json(self) -> Path:
        return self.metrics / "evaluate" / "comparison.json"

    @property
    def comparison_md(self) -> Path:
        return self.metrics / "comparison.md"
