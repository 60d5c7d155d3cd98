"""The evaluate stage's work: every model of the result scored on the test set, every pair
tested, the reports written (imgclf/reports.py), and the models below the accuracy gate named.

The heads are scored on the test bottlenecks, the fine-tuned models on the test activations
(the `orig` view, averaged with `flip` for a model saved with test_time_flip): see
imgclf/predictions.py, which the export stage shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import imgclf.heads
from imgclf.bottleneck_files import Bottlenecks, load_bottlenecks
from imgclf.evaluation import HeadResult, PairedTest, all_pairs, evaluate_head
from imgclf.heads import HEADS
from imgclf.layout import Layout
from imgclf.predictions import predict_heads
from imgclf.registry import get_model
from imgclf.reports import ReportSummary, lines_of_code, read_train_metrics, write_reports

# The head modules actually imported (for the "lines of code" column), wherever they live.
HEADS_SOURCE_DIR = Path(imgclf.heads.__file__).resolve().parent


def module_file(head: str, heads_source_dir: str | Path = HEADS_SOURCE_DIR) -> Path:
    """The source file of `head`'s module, found from the package that holds `heads_source_dir`
    (imgclf.heads.tf_head -> <imgclf>/heads/tf_head.py, imgclf.finetune.finetune_tf ->
    <imgclf>/finetune/finetune_tf.py)."""
    package_dir = Path(heads_source_dir).parent
    return package_dir.joinpath(*get_model(head).module.split(".")[1:]).with_suffix(".py")


@dataclass(frozen=True)
class Evaluation:
    results: list[HeadResult]
    tests: list[PairedTest]
    summary: ReportSummary
    failures: list[str]  # heads below min_accuracy, as "tf 0.734"


def evaluate_predictions(
    test: Bottlenecks,
    probabilities: Mapping[str, np.ndarray],
    *,
    metrics_dir: str | Path,
    split_dir: str | Path,
    heads_source_dir: str | Path,
    min_accuracy: float,
    sheet_max: int,
) -> Evaluation:
    """Score the given test-set probabilities (head -> [N, n_classes], heads in report order),
    write every report and return the results with the heads that fail the gate."""
    results = [
        evaluate_head(head, probs, test.labels, test.ids, test.classes)
        for head, probs in probabilities.items()
    ]
    tests = all_pairs(results)
    metrics_dir = Path(metrics_dir)
    layout = Layout.of(metrics=metrics_dir)
    train_metrics = {r.head: read_train_metrics(layout.train_metrics(r.head)) for r in results}
    loc = {r.head: lines_of_code(module_file(r.head, heads_source_dir)) for r in results}
    summary = write_reports(
        results,
        tests,
        metrics_dir=metrics_dir,
        split_dir=split_dir,
        train_metrics=train_metrics,
        loc=loc,
        sheet_max=sheet_max,
    )
    failures = [f"{r.head} {r.accuracy:.4f}" for r in results if r.accuracy < min_accuracy]
    return Evaluation(results, tests, summary, failures)


def score_models(
    *,
    bottleneck_dir: str | Path,
    models_dir: str | Path,
    metrics_dir: str | Path,
    split_dir: str | Path,
    min_accuracy: float,
    sheet_max: int,
    heads: Sequence[str] = HEADS,
    heads_source_dir: str | Path = HEADS_SOURCE_DIR,
    activations_dir: str | Path | None = None,
) -> Evaluation:
    """Predict the test set with every model of `heads` (report order; the stage passes
    `pipeline_models(params)`), then `evaluate_predictions`: every report written, the models
    below `min_accuracy` in `failures` (the stage's gate, applied after the reports)."""
    test = load_bottlenecks(bottleneck_dir, "test")
    return evaluate_predictions(
        test,
        predict_heads(test, models_dir, heads, activations_dir),
        metrics_dir=metrics_dir,
        split_dir=split_dir,
        heads_source_dir=heads_source_dir,
        min_accuracy=min_accuracy,
        sheet_max=sheet_max,
    )
