"""The evaluation maths against scikit-learn / scipy and against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn import metrics as skm

from imgclf.evaluation import (
    Z_95,
    PairedTest,
    all_pairs,
    confusion_matrix,
    evaluate_head,
    holm_adjusted,
    mcnemar_exact,
    metrics_dict,
    paired_test,
    wilson_interval,
)
from imgclf.reports import paired_sentence

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]

# --- Wilson score interval ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I,
        # method 3 (score interval without continuity correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_closed_forms_at_the_ends_and_symmetry() -> None:
    z2 = Z_95**2
    # k = 0: [0, z²/(n + z²)]; k = n: [n/(n + z²), 1] (the formula simplifies by hand).
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2)), 1.0)
    # Hand computation for 9/10: centre (0.9 + z²/20)/(1 + z²/10), half-width as in the formula.
    p, n = 0.9, 10
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    assert wilson_interval(9, 10) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(9, 10) == pytest.approx((0.5958, 0.9821), abs=5e-5)
    low, high = wilson_interval(30, 367)
    assert wilson_interval(337, 367) == pytest.approx((1 - high, 1 - low))


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


# --- exact McNemar -----------------------------------------------------------------------------


def test_mcnemar_hand_computed() -> None:
    # b = 7, c = 5: n = 12, P(X <= 5) = (1 + 12 + 66 + 220 + 495 + 792) / 4096 = 1586 / 4096.
    exact, mid = mcnemar_exact(7, 5)
    assert exact == pytest.approx(2 * 1586 / 4096)  # 0.7744
    assert mid == pytest.approx(2 * (1586 - 792 / 2) / 4096)  # P(X = 5) counted half
    # b = 10, c = 0: p = 2 / 2**10.
    assert mcnemar_exact(10, 0) == (pytest.approx(2 / 1024), pytest.approx(1 / 1024))
    assert mcnemar_exact(0, 0) == (1.0, 1.0)
    assert mcnemar_exact(4, 4)[0] == 1.0


@pytest.mark.parametrize("b", [0, 1, 2, 5, 9, 17, 30])
@pytest.mark.parametrize("c", [0, 1, 3, 8, 30])
def test_mcnemar_equals_scipy_binomtest(b: int, c: int) -> None:
    if b + c == 0:
        return
    exact, _ = mcnemar_exact(b, c)
    assert exact == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-15)
    assert mcnemar_exact(c, b)[0] == exact  # two-sided: symmetric in b and c


def test_mcnemar_large_counts_stay_exact() -> None:
    exact, mid = mcnemar_exact(300, 240)
    assert exact == pytest.approx(binomtest(300, 540, 0.5).pvalue, rel=1e-9)
    assert 0 < mid < exact < 0.05


def test_paired_test_counts_discordant_pairs() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ids = [f"test/x/{i}.jpg" for i in range(8)]

    def onehot(pred: list[int]) -> np.ndarray:
        return np.eye(3)[pred] * 0.8 + 0.2 / 3

    # a right on 0..5, b right on 0,1,2 and 6,7: b = 3 (idx 3,4,5), c = 2 (idx 6,7).
    a = evaluate_head("tf", onehot([0, 1, 2, 0, 1, 2, 1, 2]), labels, ids, ["a", "b", "c"])
    b = evaluate_head("keras", onehot([0, 1, 2, 1, 2, 0, 0, 1]), labels, ids, ["a", "b", "c"])
    t = paired_test(a, b)
    assert (t.a_only, t.b_only) == (3, 2)
    assert t.p_value == pytest.approx(binomtest(3, 5).pvalue)
    assert not t.significant
    assert t.as_dict()["b"] == 3 and t.as_dict()["c"] == 2
    shuffled = evaluate_head("sklearn", onehot([0] * 8), labels, ids[::-1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="different test images"):
        paired_test(a, shuffled)
    assert [(p.a, p.b) for p in all_pairs([a, b, a])] == [
        ("tf", "keras"),
        ("tf", "tf"),
        ("keras", "tf"),
    ]


@pytest.mark.parametrize(
    ("a_only", "b_only", "p_holm", "sentence"),
    [
        (7, 5, 1.0, "TF vs Keras: 7 vs 5 discordant, p = 0.77 (Holm: p = 1.00): not significant."),
        (0, 9, 0.0117, "TF vs Keras: 0 vs 9 discordant, p = 0.0039 (Holm: p = 0.012): "
         "significant, Keras is better."),
        # Significant alone, not among the report's other pairs: Holm decides.
        (19, 7, 0.17, "TF vs Keras: 19 vs 7 discordant, p = 0.029 (Holm: p = 0.17): "
         "not significant."),
        # Two digits would round 0.0496 up to the threshold and call 0.05 significant.
        (15, 5, 0.0496, "TF vs Keras: 15 vs 5 discordant, p = 0.041 (Holm: p = 0.0496): "
         "significant, TF is better."),
        # Once printed "p = < 0.001", on the README's first screen.
        (23, 5, 0.0005, "TF vs Keras: 23 vs 5 discordant, p < 0.001 (Holm: p < 0.001): "
         "significant, TF is better."),
    ],
)  # fmt: skip
def test_paired_sentence_reads_as_written(
    a_only: int, b_only: int, p_holm: float, sentence: str
) -> None:
    p_value, mid_p = mcnemar_exact(a_only, b_only)
    test = PairedTest("tf", "keras", a_only, b_only, p_value, mid_p, p_holm)
    assert paired_sentence(test) == sentence


def test_holm_adjusts_in_step_down_order_and_keeps_the_given_order() -> None:
    # Sorted 0.005, 0.01, 0.03, 0.04: times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> the running
    # maximum 0.02, 0.03, 0.06, 0.06; returned in the order given.
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjusted([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm_adjusted([0.02]) == [0.02]  # one test: nothing to adjust
    assert holm_adjusted([]) == []


def test_all_pairs_decides_significance_on_holms_p() -> None:
    labels = np.zeros(40, dtype=int)
    ids = [f"test/x/{i}.jpg" for i in range(40)]

    def right_on(n: int) -> np.ndarray:  # the first n images right, the others class 1
        return np.eye(2)[[0] * n + [1] * (40 - n)] * 0.8 + 0.1

    # Nested: a ⊂ b ⊂ c. c vs a: 7 vs 0, exact p = 0.016, times 3 (the smallest of three);
    # c vs b: 6 vs 0, p = 0.031, times 2: 0.063, not significant after Holm.
    a, b, c = (evaluate_head(n, right_on(k), labels, ids, ["x", "y"])
               for n, k in (("tf", 20), ("keras", 21), ("sklearn", 27)))  # fmt: skip
    tests = {(t.a, t.b): t for t in all_pairs([a, b, c])}
    assert [t.p_value < 0.05 for t in tests.values()] == [False, True, True]
    assert tests["tf", "sklearn"].p_holm == pytest.approx(3 * tests["tf", "sklearn"].p_value)
    assert tests["tf", "sklearn"].significant
    assert tests["keras", "sklearn"].p_value < 0.05 and not tests["keras", "sklearn"].significant
    assert paired_test(a, c).p_holm == paired_test(a, c).p_value  # a pair alone


# --- classification metrics vs scikit-learn ---------------------------------------------------


def random_predictions(seed: int, n: int = 200, k: int = len(CLASSES), skill: float = 2.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += rng.uniform(0, skill, n)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_scikit_learn(seed: int) -> None:
    labels, probs = random_predictions(seed)
    if seed == 4:
        # A class the head never predicts (precision 0/0) ...
        probs[:, 2] = 0.0
        probs /= probs.sum(axis=1, keepdims=True)
    if seed == 5:
        # ... and one absent from the test set (recall 0/0), with a confidently wrong image.
        labels[labels == 3] = 0
        probs[0] = [0, 0, 0, 0, 1.0]
        labels[0] = 1
    ids = [f"test/c/{i:04d}.jpg" for i in range(len(labels))]
    r = evaluate_head("tf", probs, labels, ids, CLASSES)
    all_labels = list(range(len(CLASSES)))
    pred = probs.argmax(axis=1)

    assert r.accuracy == pytest.approx(skm.accuracy_score(labels, pred))
    # scikit-learn's own macro average: over the classes of the labels and the predictions.
    assert r.macro_f1 == pytest.approx(skm.f1_score(labels, pred, average="macro", zero_division=0))
    p, rc, f, s = skm.precision_recall_fscore_support(
        labels, pred, labels=all_labels, zero_division=0
    )
    np.testing.assert_allclose(r.precision, p)
    np.testing.assert_allclose(r.recall, rc)
    np.testing.assert_allclose(r.f1, f)
    np.testing.assert_array_equal(r.support, s)
    np.testing.assert_array_equal(r.matrix, skm.confusion_matrix(labels, pred, labels=all_labels))
    assert r.log_loss == pytest.approx(skm.log_loss(labels, probs, labels=all_labels), rel=1e-9)
    assert (r.ci_low, r.ci_high) == wilson_interval(r.n_correct, r.n_test)
    np.testing.assert_allclose(r.confidence, probs.max(axis=1))


def test_a_class_neither_in_the_test_set_nor_predicted_is_left_out_of_macro_f1() -> None:
    # A pre-split tree's class without a test image: every image right must be macro-F1 1,
    # not 2/3 (the class's 0/0 F1 averaged in); the class keeps its row, support 0.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    ids = [f"test/c/{i}.jpg" for i in range(8)]
    r = evaluate_head("tf", probs, labels, ids, ["daisy", "roses", "tulips"])
    assert r.accuracy == 1.0 and r.macro_f1 == 1.0
    np.testing.assert_array_equal(r.support, [4, 4, 0])
    # Predicted but absent from the test set: it counts, with F1 0.
    probs[0] = [0.0, 0.0, 1.0]
    r = evaluate_head("tf", probs, labels, ids, ["daisy", "roses", "tulips"])
    assert r.macro_f1 == pytest.approx((2 * 3 / 7 + 1.0 + 0.0) / 3)


def test_confusion_matrix_orientation() -> None:
    # Row = actual, column = predicted.
    m = confusion_matrix(np.array([0, 0, 1]), np.array([1, 1, 1]), 2)
    np.testing.assert_array_equal(m, [[0, 2], [0, 1]])


def test_metrics_dict_is_rounded_and_complete() -> None:
    labels, probs = random_predictions(1, n=37)
    d = metrics_dict(evaluate_head("keras", probs, labels, [str(i) for i in range(37)], CLASSES))
    assert set(d) >= {"accuracy", "ci_low", "ci_high", "macro_f1", "log_loss", "n_test"}
    assert d["n_test"] == 37 and list(d["per_class"]) == CLASSES
    assert set(d["per_class"]["roses"]) == {"precision", "recall", "f1", "support"}
    assert all(round(v, 6) == v for v in (d["accuracy"], d["ci_low"], d["log_loss"]))
    assert d["ci_low"] <= d["accuracy"] <= d["ci_high"]


def test_evaluate_head_explains_shape_mismatch() -> None:
    labels, probs = random_predictions(0, n=10)
    with pytest.raises(ValueError, match=r"shape \(10, 4\)"):
        evaluate_head("sklearn", probs, labels, [str(i) for i in range(10)], CLASSES[:4])
    probs[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_head("sklearn", probs, labels, [str(i) for i in range(10)], CLASSES)
