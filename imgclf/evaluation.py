"""Test-set statistics for the heads: accuracy with a confidence interval, per-class scores,
log loss, the confusion matrix, and a paired significance test between two heads.

scikit-learn computes the confusion matrix, per-class scores and log loss, SciPy the binomial
test; this module fixes the conventions the reports rely on:

- Accuracy CI: the Wilson score interval at 95% (z = 1.96). Unlike the normal ("Wald")
  interval it stays inside [0, 1] and keeps close to its nominal coverage near 100%
  accuracy and on small test sets, which is where the heads live.
- Paired test: exact McNemar, i.e. a two-sided binomial test of b against b + c with
  p = 1/2, where b = images head A gets right and head B gets wrong, c = the reverse.
  Images both get right (or both wrong) carry no information about which head is better.
  We use the conventional exact (conditional) p-value, 2 * P(X <= min(b, c)) capped at 1,
  which never exceeds the nominal 5% error rate; the mid-p value (less conservative) is
  reported alongside for reference, but "significant" is decided on the exact p.
- Many pairs: a report tests every pair of its models (ten for five), so "significant" is
  decided on Holm's adjusted p over the report's pairs, which keeps the chance of any false
  call at 5%; the exact p of each pair is shown beside it.
- Every class counts that the test set holds or the head predicts, as scikit-learn's macro
  average takes them: one never predicted scores F1 0 (zero_division=0), so a head is not
  rewarded for never predicting a class, and one predicted but absent from the test set
  scores 0 too (its predictions are all wrong). A class in neither (a pre-split tree's class
  without a test image, that nothing predicts) has no F1 to average and is left out of the
  macro-F1; its per-class row stays, with support 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn import metrics as skm

# Two-sided 95%: the 0.975 quantile of the standard normal.
Z_95 = 1.959963984540054
ALPHA = 0.05


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `successes / n`."""
    if n <= 0:
        raise ValueError(f"Wilson interval needs n > 0 trials, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k = 0 (k = n) the lower (upper) bound is exactly 0 (1); float rounding says 1e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> tuple[float, float]:
    """Exact McNemar test on the discordant counts b and c: (exact p, mid-p), two-sided.

    Exact: scipy's two-sided binomial test of b out of b + c at 1/2, which for this
    symmetric null is 2 * P(X <= min(b, c)) capped at 1. Mid-p: the same with only half
    the probability of the observed value counted. No discordant pairs means no evidence
    either way: p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0, 1.0
    exact = float(binomtest(b, n, 0.5).pvalue)
    # b != c: 2 * P(X <= min(b, c)) <= 1, so the exact p is uncapped and the mid-p is it
    # minus P(X = min(b, c)), in exact integers (scipy's pmf is an ulp off, which moves the
    # rounded report at exact halves like 1/128). b == c: the centre of the null, p = 1.
    mid = 1.0 if b == c else exact - math.comb(n, min(b, c)) / 2**n
    return exact, mid


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times the
    number of hypotheses not yet rejected (m - i + 1), never below the one before it, capped
    at 1. Rejecting where the adjusted p < alpha keeps the family-wise error at alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """matrix[i, j] = number of test images of class i predicted as class j."""
    return skm.confusion_matrix(labels, predicted, labels=np.arange(n_classes)).astype(np.int64)


def per_class_scores(
    labels: np.ndarray, predicted: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support, every class included (see the module
    docstring for zero denominators)."""
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=np.arange(n_classes), zero_division=0
    )
    return precision, recall, f1, support


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log), clipped to
    [eps, 1 - eps] so one confidently wrong image gives a large but finite loss."""
    probs = np.asarray(probabilities, dtype=np.float64)
    with warnings.catch_warnings():
        # The heads' float32 softmax sums to 1 within ~1e-7, looser than sklearn's check.
        warnings.filterwarnings("ignore", message=".*do not sum to one", category=UserWarning)
        return float(skm.log_loss(np.asarray(labels), probs, labels=np.arange(probs.shape[1])))


@dataclass(frozen=True)
class HeadResult:
    """One head's predictions on the test set and the statistics derived from them."""

    head: str
    classes: list[str]
    ids: np.ndarray  # str [N]
    labels: np.ndarray  # int [N]
    probabilities: np.ndarray  # float [N, n_classes]
    predicted: np.ndarray  # int [N]
    confidence: np.ndarray  # float [N], probability of the predicted class
    matrix: np.ndarray  # int [n_classes, n_classes]
    accuracy: float
    ci_low: float
    ci_high: float
    macro_f1: float
    log_loss: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray

    @property
    def n_test(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels

    @property
    def n_correct(self) -> int:
        return int(np.sum(self.correct))


def evaluate_head(
    head: str,
    probabilities: np.ndarray,
    labels: np.ndarray,
    ids: Sequence[str] | np.ndarray,
    classes: Sequence[str],
) -> HeadResult:
    """Score one head's test-set probabilities [N, n_classes] against the true labels [N]."""
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.asarray(ids, dtype=str)
    n_classes = len(classes)
    if probs.ndim != 2 or probs.shape != (len(labels), n_classes):
        raise ValueError(
            f"{head}: expected probabilities of shape ({len(labels)}, {n_classes}) "
            f"(test images, classes), got {probs.shape}; was the head trained on these "
            "bottlenecks and classes.json?"
        )
    if len(ids) != len(labels):
        raise ValueError(f"{head}: {len(ids)} ids for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{head}: the test set is empty")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"{head}: labels outside [0, {n_classes}) in the test set")
    if not np.all(np.isfinite(probs)):
        raise ValueError(f"{head}: the head returned non-finite probabilities (NaN/inf)")

    # argmax takes the first maximum on ties, so the result does not depend on anything
    # but the probabilities.
    predicted = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(probs)), predicted]
    matrix = confusion_matrix(labels, predicted, n_classes)
    precision, recall, f1, support = per_class_scores(labels, predicted, n_classes)
    n_correct = int(np.trace(matrix))
    low, high = wilson_interval(n_correct, len(labels))
    return HeadResult(
        head=head,
        classes=list(classes),
        ids=ids,
        labels=labels,
        probabilities=probs,
        predicted=predicted,
        confidence=confidence,
        matrix=matrix,
        accuracy=n_correct / len(labels),
        ci_low=low,
        ci_high=high,
        macro_f1=float(np.mean(f1[np.union1d(labels, predicted)])),
        log_loss=log_loss(labels, probs),
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
    )


def _r(x: float, digits: int = 6) -> float:
    # Fixed rounding keeps the JSON byte-identical across reruns and readable in diffs.
    return round(float(x), digits)


def metrics_dict(result: HeadResult) -> dict[str, Any]:
    """The `metrics/evaluate/<head>.json` payload (what `dvc metrics show/diff` reads)."""
    per_class = {
        name: {
            "precision": _r(result.precision[i]),
            "recall": _r(result.recall[i]),
            "f1": _r(result.f1[i]),
            "support": int(result.support[i]),
        }
        for i, name in enumerate(result.classes)
    }
    return {
        "accuracy": _r(result.accuracy),
        "ci_low": _r(result.ci_low),
        "ci_high": _r(result.ci_high),
        "ci_method": "wilson-95",
        "macro_f1": _r(result.macro_f1),
        "log_loss": _r(result.log_loss),
        "n_test": result.n_test,
        "n_correct": result.n_correct,
        "per_class": per_class,
    }


@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of head `a` against head `b` on the same test images."""

    a: str
    b: str
    a_only: int  # "b" in McNemar's notation: a right, b wrong
    b_only: int  # "c": a wrong, b right
    p_value: float
    mid_p: float
    # Holm's adjusted p over the pairs tested with it (all_pairs); alone, the exact p.
    p_holm: float

    @property
    def significant(self) -> bool:
        return self.p_holm < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return {
            # McNemar's b and c for the pair "<a>_vs_<b>": a right & b wrong, a wrong & b right.
            # Numbers only (no descriptive strings): `dvc metrics show` makes a column of each.
            "b": self.a_only,
            "c": self.b_only,
            "n_discordant": self.a_only + self.b_only,
            "p_value": _r(self.p_value),
            "mid_p": _r(self.mid_p),
            "p_holm": _r(self.p_holm),
            "significant": self.significant,
        }


def paired_test(first: HeadResult, second: HeadResult) -> PairedTest:
    """McNemar's exact test on the images both heads saw (same ids, same order)."""
    if not np.array_equal(first.ids, second.ids):
        raise ValueError(
            f"{first.head} and {second.head} were scored on different test images; "
            "a paired test needs the same images in the same order"
        )
    a_only = int(np.sum(first.correct & ~second.correct))
    b_only = int(np.sum(~first.correct & second.correct))
    exact, mid = mcnemar_exact(a_only, b_only)
    return PairedTest(first.head, second.head, a_only, b_only, exact, mid, p_holm=exact)


def all_pairs(results: Sequence[HeadResult]) -> list[PairedTest]:
    """Every pair in the given head order: (tf, keras), (tf, sklearn), (keras, sklearn), each
    with its Holm-adjusted p over all of them."""
    tests = [
        paired_test(results[i], results[j])
        for i in range(len(results))
        for j in range(i + 1, len(results))
    ]
    adjusted = holm_adjusted([t.p_value for t in tests])
    return [replace(t, p_holm=p) for t, p in zip(tests, adjusted, strict=True)]
