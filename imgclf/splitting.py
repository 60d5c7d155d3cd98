"""Stratified, stable, duplicate-proof train/test assignment and the split trees.

Each image gets a score from a hash of (seed, its content's sha256), uniform in [0, 1).
Within a class the lowest-scoring images go to test, as many as the class's share. Because
the score depends only on the image's content, adding images to a class moves at most the
few images near the class's cut-off (retrain.py's stability idea, made stratified), and
renaming a file moves nothing.

A pre-split tree kept as given (ingest.presplit=keep) carries its subsets in the manifest's
`given_subset` column; `given_subsets` then replaces the stratified assignment, and the split
summary says so (`"method": "given"`).

`validation_split` carves the validation slice out of the train images the same way for every
model and for the label audit (seeded, stratified), so all of them are judged on one slice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from imgclf.errors import UserError

SUBSETS = ("train", "test")
GIVEN_SUBSET_FIELD = "given_subset"  # ingest.GIVEN_SUBSET_FIELD (ingest imports nothing here)


class SplitError(UserError, ValueError):
    """The images cannot be split as asked (a class too small, a bad fraction...)."""


def content_score(sha256: str, seed: int) -> float:
    """A deterministic, uniform score in [0, 1) for an image's content."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_subsets(
    rows: Sequence[Mapping[str, str]],
    *,
    test_fraction: float,
    seed: int,
    min_per_class: int,
) -> list[str]:
    """Return "train" or "test" for every row (each row has `class`, `file`, `sha256`).

    - Stratified: each class gets round(n * test_fraction) test images, but at least one and
      at most n - 1 (within one image of the target when identical content forces a side,
      see below).
    - Identical content never lands on both sides: within a class, copies move together;
      content filed under several classes has its side fixed by its score alone.
    """
    if not 0.0 < test_fraction < 1.0:
        raise SplitError(f"split.test_fraction must be between 0 and 1, got {test_fraction}")
    by_class: dict[str, list[int]] = defaultdict(list)
    classes_of_content: dict[str, set[str]] = defaultdict(set)
    for i, row in enumerate(rows):
        by_class[row["class"]].append(i)
        classes_of_content[row["sha256"]].add(row["class"])

    too_small = {c: len(ix) for c, ix in by_class.items() if len(ix) < min_per_class}
    if too_small:
        listing = ", ".join(f"'{c}' has {n}" for c, n in sorted(too_small.items()))
        raise SplitError(
            f"class too small to split: {listing} image(s); split.min_per_class is "
            f"{min_per_class}. Add images to the class, remove it from the source, or lower "
            "split.min_per_class in params.yaml."
        )

    subsets = [""] * len(rows)
    for indices in by_class.values():
        # At least one image on each side of a class of two or more: round() alone gives a
        # class of 5 no training image at test_fraction 0.95 (nothing to learn it from) and
        # no test image at 0.05 (nothing to score it on).
        target = min(max(round(len(indices) * test_fraction), 1), len(indices) - 1)
        # A unit is all the rows with the same content: they always share a side.
        units: dict[str, list[int]] = defaultdict(list)
        for i in indices:
            units[rows[i]["sha256"]].append(i)
        pinned, free = [], []
        for sha in units:
            several_classes = len(classes_of_content[sha]) > 1
            (pinned if several_classes else free).append((content_score(sha, seed), sha))
        # Content filed under several classes: its score alone sets its side, in every class.
        sides = {sha: "test" if score < test_fraction else "train" for score, sha in pinned}
        n_test = sum(len(units[sha]) for sha, side in sides.items() if side == "test")
        for _, sha in sorted(free):
            sides[sha] = "test" if n_test < target else "train"
            n_test += len(units[sha]) if sides[sha] == "test" else 0
        for sha, side in sides.items():
            for i in units[sha]:
                subsets[i] = side
    return subsets


def given_subsets(rows: Sequence[Mapping[str, str]], *, min_per_class: int) -> list[str] | None:
    """The subsets a kept pre-split tree gave every row, or None when the manifest has none
    (an older manifest, or any other source). A class without a training image is an error;
    one without a test image is allowed (`split_summary` lists it)."""
    if not rows or not any(row.get(GIVEN_SUBSET_FIELD) for row in rows):
        return None
    subsets = [row.get(GIVEN_SUBSET_FIELD, "") for row in rows]
    wrong = sorted({s for s in subsets if s not in SUBSETS})
    if wrong:
        raise SplitError(
            f"the manifest's {GIVEN_SUBSET_FIELD} column holds {', '.join(map(repr, wrong))}; "
            f"expected {' or '.join(SUBSETS)}. Re-run the ingest stage."
        )
    per_class: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SUBSETS, 0))
    for row, subset in zip(rows, subsets, strict=True):
        per_class[row["class"]][subset] += 1
    too_small = {c: n["train"] + n["test"] for c, n in per_class.items()}
    too_small = {c: n for c, n in too_small.items() if n < min_per_class}
    no_train = sorted(c for c, n in per_class.items() if not n["train"])
    if too_small or no_train:
        listing = ", ".join(f"'{c}' has {n}" for c, n in sorted(too_small.items()))
        problems = [f"class too small: {listing} image(s) (split.min_per_class)"] * bool(too_small)
        problems += [f"no training image in your train folder for: {', '.join(no_train)}"] * bool(
            no_train
        )
        raise SplitError(
            "the pre-split tree's own split cannot be used: "
            + "; ".join(problems)
            + ". Add images, or pool the folders and let split re-split them "
            "(dvc exp run -S ingest.presplit=pool)."
        )
    return subsets


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (free, instant) and fall back to a copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_split_trees(
    rows: Iterable[Mapping[str, str]], subsets: Sequence[str], images_dir: Path, split_dir: Path
) -> list[dict[str, str]]:
    """Fill `split_dir/{train,test}/<class>/` and return the split manifest rows."""
    for subset in SUBSETS:
        shutil.rmtree(split_dir / subset, ignore_errors=True)
    out_rows = []
    for row, subset in zip(rows, subsets, strict=True):
        relative = f"{subset}/{row['file']}"
        link_or_copy(images_dir / row["file"], split_dir / relative)
        out_rows.append({**row, "file": relative, "subset": subset})
    return sorted(out_rows, key=lambda r: r["file"])


# The heads carve a validation slice out of each class's training images (validation_split),
# which needs one image to validate on and one to train on.
MIN_TRAIN_PER_CLASS = 2


def check_training_images(
    rows: Sequence[Mapping[str, str]], subsets: Sequence[str], *, given: bool
) -> None:
    """Refuse a split that leaves a class fewer than MIN_TRAIN_PER_CLASS training images,
    naming the class, before the stages after it fail on it with a class number."""
    train: dict[str, int] = defaultdict(int)
    for row, subset in zip(rows, subsets, strict=True):
        train[row["class"]] += subset == "train"
    small = {c: n for c, n in sorted(train.items()) if n < MIN_TRAIN_PER_CLASS}
    if not small:
        return
    listing = ", ".join(f"'{c}' has {n}" for c, n in small.items())
    todo = (
        "Add images to your train folder, or pool the folders and let split re-split them "
        "(dvc exp run -S ingest.presplit=pool)."
        if given
        else f"Add images to the class, or raise split.min_per_class to "
        f"{MIN_TRAIN_PER_CLASS + 1} so that a class this small stops the split with its name."
    )
    raise SplitError(
        f"too few training images after the split: {listing} (the heads' validation slice "
        f"needs at least {MIN_TRAIN_PER_CLASS} a class: one to validate on, one to train on). "
        + todo
    )


def split_summary(
    split_rows: Iterable[Mapping[str, str]], test_fraction: float, *, given: bool = False
) -> dict:
    """Per-class counts and the realised test share, for metrics/split.json.

    `method` is "stratified" (ours), or "given" for a kept pre-split tree; then `given_from`
    names the user's folders behind each subset (the first component of `origin`) and
    split.test_fraction and split.seed play no part."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SUBSETS, 0))
    folders: dict[str, set[str]] = defaultdict(set)
    for row in split_rows:
        counts[row["class"]][row["subset"]] += 1
        folders[row["subset"]].add(row.get("origin", "").split("/")[0])
    train = sum(c["train"] for c in counts.values())
    test = sum(c["test"] for c in counts.values())
    summary: dict = {
        "method": "given" if given else "stratified",
        "classes": len(counts),
        "train": train,
        "test": test,
        "test_fraction_target": None if given else test_fraction,
        "test_fraction": round(test / max(train + test, 1), 4),
        "per_class": {name: counts[name] for name in sorted(counts)},
    }
    if given:
        summary["given_from"] = {s: sorted(folders[s]) for s in SUBSETS}
        summary["classes_without_test"] = sorted(c for c, n in counts.items() if not n["test"])
    return summary


def validation_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic (train_idx, val_idx) over `labels`, both sorted and disjoint.

    Each class gives round(fraction * n_class) images (at least 1, at most n_class - 1), drawn
    from a generator seeded by `seed`, so the slice depends only on (labels, fraction, seed): every
    head, and every rerun, sees the same one.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heads.validation_fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size < 2:
            raise ValueError(
                f"class {cls} has {members.size} training image(s): a validation slice needs "
                "at least 2 per class (lower split.test_fraction or add images)"
            )
        n_val = min(max(1, round(fraction * members.size)), members.size - 1)
        val_parts.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    train_mask = np.ones(labels.shape[0], dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx
