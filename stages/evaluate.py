"""Stage evaluate: score every model of the result (params.yaml `models` + `finetune_models`)
on the test set, compare them pairwise, write the reports, then apply the accuracy gate
(evaluate.min_accuracy). The work is imgclf/scoring.py's.

The gate runs last on purpose: when a head is below the bar the reports are already on disk,
so one can see why (confusion matrix, misclassified images) before fixing anything.
"""

from __future__ import annotations

import sys

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.config import load_params
from imgclf.errors import StageFailed
from imgclf.layout import Layout
from imgclf.params import EvaluateParams
from imgclf.registry import pipeline_models
from imgclf.reports import display_name
from imgclf.scoring import score_models
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    layout = Layout.from_params(params)
    hp = EvaluateParams.from_params(params)
    evaluation = score_models(
        bottleneck_dir=layout.bottlenecks,
        models_dir=layout.models,
        metrics_dir=layout.metrics,
        split_dir=layout.split,
        min_accuracy=hp.min_accuracy,
        sheet_max=hp.misclassified_sheet_max,
        heads=pipeline_models(params),
        activations_dir=layout.activations,
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
            f"not be read from {layout.split} for the contact sheets (grey placeholders)",
            file=sys.stderr,
        )
    print(f"evaluate: reports in {layout.metrics} (comparison.md, evaluate/, confusion/, "
          "misclassified/)")  # fmt: skip
    if evaluation.failures:
        raise StageFailed(
            f"FAILED the accuracy gate evaluate.min_accuracy = {hp.min_accuracy}: "
            f"{', '.join(evaluation.failures)}. All reports are written; see "
            f"{layout.metrics / 'misclassified'} and retrain, or lower the bar with "
            "`dvc exp run -S evaluate.min_accuracy=...`."
        )


if __name__ == "__main__":
    main()
