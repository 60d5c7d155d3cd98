"""Stage evaluate: score every model of the result (params.yaml `models` + `finetune_models`)
on the test set, compare them pairwise, write the reports, then apply the accuracy gate
(evaluate.min_accuracy).

The heads are scored on the test bottlenecks, the fine-tuned models on the test activations
(the `orig` view, averaged with `flip` for a model saved with test_time_flip): see
imgclf/predictions.py, which the export stage shares.

The gate runs last on purpose: when a head is below the bar the reports are already on disk,
so one can see why (confusion matrix, misclassified images) before fixing anything.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import imgclf.heads
import imgclf.quiet_tf  # TensorFlow without its start-up notices
from imgclf.bottleneck_files import Bottlenecks, load_bottlenecks
from imgclf.config import load_params
from imgclf.errors import StageFailed
from imgclf.evaluation import HeadResult, PairedTest, all_pairs, evaluate_head
from imgclf.heads import HEADS
from imgclf.layout import Layout
from imgclf.params import EvaluateParams
from imgclf.predictions import predict_heads
from imgclf.registry import get_model, pipeline_models
from imgclf.reports import (
    ReportSummary,
    display_name,
    lines_of_code,
    read_train_metrics,
    write_reports,
)
from imgclf.stage import stage_main

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


def run(
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
) -> int:
    """The whole stage. Raises StageFailed, after writing every report, when a model is below
    `min_accuracy`; returns 0 otherwise (kept for callers that check a status). `heads`: the
    models to score, in report order (the stage: `pipeline_models(params)`)."""
    test = load_bottlenecks(bottleneck_dir, "test")
    evaluation = evaluate_predictions(
        test,
        predict_heads(test, models_dir, heads, activations_dir),
        metrics_dir=metrics_dir,
        split_dir=split_dir,
        heads_source_dir=heads_source_dir,
        min_accuracy=min_accuracy,
        sheet_max=sheet_max,
    )
    for r in evaluation.results:
        print(
            f"evaluate: {display_name(r.head):>12}  accuracy {r.accuracy:.4f} "
            f"[{r.ci_low:.4f}, {r.ci_high:.4f}]  macro-F1 {r.macro_f1:.4f}  "
            f"log loss {r.log_loss:.4f}  ({r.n_test - r.n_correct} of {r.n_test} wrong)"
        )
    for t in evaluation.tests:
        print(
            f"evaluate: {t.a} vs {t.b}: test images right only by {t.a}: {t.a_only}, "
            f"only by {t.b}: {t.b_only}; exact McNemar p={t.p_value:.4g}, Holm p={t.p_holm:.4g}"
            f"{' (significant)' if t.significant else ' (not significant)'}"
        )
    if evaluation.summary.unreadable_thumbnails:
        print(
            f"evaluate: {evaluation.summary.unreadable_thumbnails} misclassified image(s) could "
            f"not be read from {split_dir} for the contact sheets (grey placeholders)",
            file=sys.stderr,
        )
    print(f"evaluate: reports in {metrics_dir} (comparison.md, evaluate/, confusion/, "
          "misclassified/)")  # fmt: skip
    if evaluation.failures:
        raise StageFailed(
            f"FAILED the accuracy gate evaluate.min_accuracy = {min_accuracy}: "
            f"{', '.join(evaluation.failures)}. All reports are written; see "
            f"{Path(metrics_dir) / 'misclassified'} and retrain, or lower the bar with "
            "`dvc exp run -S evaluate.min_accuracy=...`."
        )
    return 0


@stage_main
def main() -> None:
    params = load_params()
    layout = Layout.from_params(params)
    hp = EvaluateParams.from_params(params)
    run(
        bottleneck_dir=layout.bottlenecks,
        models_dir=layout.models,
        metrics_dir=layout.metrics,
        split_dir=layout.split,
        min_accuracy=hp.min_accuracy,
        sheet_max=hp.misclassified_sheet_max,
        heads=pipeline_models(params),
        activations_dir=layout.activations,
    )


if __name__ == "__main__":
    main()
