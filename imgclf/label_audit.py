"""Training labels that look wrong: confident learning on out-of-fold probabilities.

A photo filed under the wrong class (a rose in tulips/, a windmill in tulips/, a shop sign in
roses/) teaches every model the wrong thing. The audit finds such photos among the training
images the way cleanlab's `find_label_issues` does: a scikit-learn logistic regression on the
bottlenecks gives every image out-of-fold probabilities (k folds, so no image is scored by a
model that saw its label), and confident learning flags the images whose given label those
probabilities contradict, class by class.

Only the training images are audited: never the validation slice (the models are chosen on
it, so it must stay the data as given) and never the test set. The list is a report first
(metrics/label_issues.csv, .png); `heads.drop_label_issues: true` then trains every model
without the flagged images, with the validation slice and the test set left as they are, so
the scores stay comparable with and without the drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.errors import MissingInput, UserError
from imgclf.fileio import read_csv, write_csv
from imgclf.params import LABEL_AUDIT_FILTERS as FILTERS

LABEL_ISSUE_COLUMNS = ("id", "label", "suggested", "p_label", "p_suggested")


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, *, folds: int, seed: int, C: float, max_iter: int
) -> np.ndarray:
    """[N, n_classes] probabilities of a standardized logistic regression, each row from the
    model of the fold that left it out (stratified folds, shuffled by `seed`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y)
    smallest = int(np.bincount(y).min()) if y.size else 0
    if smallest < folds:
        raise UserError(
            f"the label audit splits the training images into audit.folds={folds} folds, but "
            f"a class has only {smallest} training image(s) outside the validation slice: "
            "lower audit.folds (at least 2), lower heads.validation_fraction (the slice is taken "
            "from the same training images) or add images"
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")


def find_label_issues(
    ids: Sequence[str],
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    *,
    filter_by: str,
) -> list[dict[str, Any]]:
    """The images cleanlab flags, the least likely label first (ties: by id): `p_label` is the
    out-of-fold probability of the given label, `suggested` the most probable class."""
    from cleanlab.filter import find_label_issues as cleanlab_find

    if filter_by not in FILTERS:
        raise ValueError(f"filter_by must be one of {FILTERS}, not {filter_by!r}")
    labels = np.asarray(labels)
    # n_jobs=1: the same list on every machine, and no worker processes for a seconds' job.
    flagged = np.flatnonzero(cleanlab_find(labels, probabilities, filter_by=filter_by, n_jobs=1))
    # The least likely label first, by the unrounded probability (ties: by id).
    p_label = probabilities[flagged, labels[flagged]]
    flagged = flagged[np.lexsort((np.asarray(ids)[flagged], p_label))]
    rows = []
    for i in flagged:
        suggested = int(np.argmax(probabilities[i]))
        rows.append(
            {
                "id": str(ids[i]),
                "label": classes[labels[i]],
                "suggested": classes[suggested],
                "p_label": round(float(probabilities[i, labels[i]]), 4),
                "p_suggested": round(float(probabilities[i, suggested]), 4),
            }
        )
    return rows


def write_label_issues(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    write_csv(path, LABEL_ISSUE_COLUMNS, rows, fixed_decimals={"p_label": 4, "p_suggested": 4})


def read_label_issues(path: str | Path) -> list[str]:
    """The ids of the audit's list (metrics/label_issues.csv)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(
            f"{path} not found: heads.drop_label_issues is true, so the models train without the "
            "images the label audit flags; run it first (dvc repro audit)"
        )
    rows = read_csv(path)
    if rows and "id" not in rows[0]:
        raise UserError(
            f"{path}: expected the columns {', '.join(LABEL_ISSUE_COLUMNS)}, found "
            f"{', '.join(rows[0])}: rerun the label audit (dvc repro audit)"
        )
    return [row["id"] for row in rows]


def audit_summary(
    rows: Sequence[Mapping[str, Any]], labels: np.ndarray, probabilities: np.ndarray,
    classes: Sequence[str],
) -> dict[str, Any]:  # fmt: skip
    """metrics/audit.json: how many images were audited and flagged, overall and per class."""
    labels = np.asarray(labels)
    flagged = {c: 0 for c in classes}
    for row in rows:
        flagged[row["label"]] += 1
    return {
        "images_audited": int(labels.size),
        "label_issues": len(rows),
        "label_issue_share": round(len(rows) / labels.size, 4) if labels.size else 0.0,
        "out_of_fold_accuracy": round(float((probabilities.argmax(1) == labels).mean()), 4)
        if labels.size
        else 0.0,
        "per_class": {
            c: {"audited": int((labels == k).sum()), "label_issues": flagged[c]}
            for k, c in enumerate(classes)
        },
    }


def without_ids(ids: np.ndarray, rows: np.ndarray, excluded: Iterable[str]) -> np.ndarray:
    """`rows` (positions into `ids`) minus those whose id is in `excluded`. Every excluded id
    must be among them: a list made for another split (or another data set) would otherwise
    leave out less than it says, or touch the validation slice."""
    excluded = np.asarray(list(excluded), dtype=str)
    if not excluded.size:
        return rows
    row_ids = np.asarray(ids)[rows]
    if unknown := sorted(set(excluded.tolist()) - set(row_ids.tolist())):
        raise UserError(
            f"the label audit's list names {len(unknown)} image(s) that are not training images "
            f"of this split (e.g. {unknown[0]}): it was made for another split or data set; "
            "rerun it (dvc repro audit)"
        )
    return rows[~np.isin(row_ids, excluded)]
