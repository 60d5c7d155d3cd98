"""The split: stratified, deterministic, stable, duplicate-proof, with hard-linked trees."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from imgclf.fileio import read_csv, read_metrics, sha256_file, write_csv
from imgclf.splitting import SplitError, assign_subsets, check_training_images
from tests.helpers import make_class_tree

ROOT = Path(__file__).resolve().parents[1]


def fake_rows(counts: dict[str, int], start: int = 0) -> list[dict[str, str]]:
    rows = []
    for name, n in counts.items():
        for i in range(start, start + n):
            sha = hashlib.sha256(f"{name}/{i}".encode()).hexdigest()
            rows.append({"class": name, "file": f"{name}/{i}.jpg", "sha256": sha})
    return rows


def test_each_class_test_share_is_within_one_image_of_target():
    counts = {"a": 317, "b": 449, "c": 7, "d": 10, "e": 123}
    rows = fake_rows(counts)
    subsets = assign_subsets(rows, test_fraction=0.2, seed=0, min_per_class=5)
    tests = Counter(r["class"] for r, s in zip(rows, subsets, strict=True) if s == "test")
    for name, n in counts.items():
        assert abs(tests[name] - 0.2 * n) <= 1, (name, tests[name], n)


@pytest.mark.parametrize("fraction", [0.05, 0.95])
def test_every_class_keeps_an_image_on_each_side_at_extreme_fractions(fraction):
    # round(5 * 0.95) = 5: the class had nothing to learn from; round(5 * 0.05) = 0: nothing
    # to be scored on.
    rows = fake_rows({"a": 5, "b": 6, "c": 400})
    subsets = assign_subsets(rows, test_fraction=fraction, seed=0, min_per_class=5)
    sides = Counter((r["class"], s) for r, s in zip(rows, subsets, strict=True))
    assert all(sides[c, side] >= 1 for c in "abc" for side in ("train", "test")), sides
    assert sides["c", "test"] == round(400 * fraction)  # a large class: round() as before


def test_same_input_and_params_give_the_same_split_and_seed_changes_it():
    rows = fake_rows({"a": 50, "b": 60})
    first = assign_subsets(rows, test_fraction=0.2, seed=1, min_per_class=5)
    assert first == assign_subsets(list(rows), test_fraction=0.2, seed=1, min_per_class=5)
    # Order of the manifest does not matter either.
    reordered = assign_subsets(rows[::-1], test_fraction=0.2, seed=1, min_per_class=5)
    assert first == reordered[::-1]
    assert first != assign_subsets(rows, test_fraction=0.2, seed=2, min_per_class=5)


def test_adding_a_few_images_moves_at_most_a_few_existing_ones():
    rows = fake_rows({"a": 200, "b": 150})
    before = dict(
        zip(
            (r["file"] for r in rows),
            assign_subsets(rows, test_fraction=0.2, seed=0, min_per_class=5),
            strict=True,
        )
    )
    grown = rows + fake_rows({"a": 5}, start=1000)
    after = dict(
        zip(
            (r["file"] for r in grown),
            assign_subsets(grown, test_fraction=0.2, seed=0, min_per_class=5),
            strict=True,
        )
    )
    moved = [f for f in before if before[f] != after[f]]
    assert len(moved) <= 5
    assert all(f.startswith("a/") for f in moved)


def test_identical_content_never_lands_on_both_sides():
    rows = fake_rows({"a": 30, "b": 30})
    # The same bytes filed under both classes (ingest with cross_class_duplicates: keep),
    # and an in-class copy.
    shared = [r for r in rows if r["class"] == "a"][:6]
    rows += [
        {"class": "b", "file": f"b/dup{i}.jpg", "sha256": r["sha256"]} for i, r in enumerate(shared)
    ]
    rows += [
        {"class": "a", "file": f"a/copy{i}.jpg", "sha256": r["sha256"]}
        for i, r in enumerate(shared)
    ]
    subsets = assign_subsets(rows, test_fraction=0.2, seed=0, min_per_class=5)
    sides: dict[str, set[str]] = {}
    for row, side in zip(rows, subsets, strict=True):
        sides.setdefault(row["sha256"], set()).add(side)
    assert all(len(s) == 1 for s in sides.values())


def test_a_class_too_small_is_an_error_naming_it_and_its_count():
    rows = fake_rows({"big": 40, "tiny": 3})
    with pytest.raises(SplitError, match=r"'tiny' has 3.*min_per_class"):
        assign_subsets(rows, test_fraction=0.2, seed=0, min_per_class=5)


def run_split_stage(
    workdir: Path, classes: dict[str, int], seed: int = 0
) -> subprocess.CompletedProcess:
    images = make_class_tree(workdir / "data" / "images", classes)
    rows = [
        {
            "class": p.parent.name,
            "label": p.parent.name,
            "file": p.relative_to(images).as_posix(),
            "sha256": sha256_file(p),
            "width": "64",
            "height": "48",
            "format": "JPEG",
            "origin": str(p),
        }
        for p in sorted(images.rglob("*.jpg"))
    ]
    write_csv(workdir / "data" / "manifest.csv", list(rows[0]), rows)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["seed"] = seed
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stages.split"], cwd=workdir, env=env, capture_output=True, text=True
    )


def test_stage_writes_hard_linked_trees_manifest_and_metrics(tmp_path):
    done = run_split_stage(tmp_path, {"daisy": 12, "roses": 10})
    assert done.returncode == 0, done.stderr
    split = tmp_path / "data" / "split"
    manifest = read_csv(split / "manifest.csv")
    assert {r["subset"] for r in manifest} == {"train", "test"}
    for row in manifest:
        path = split / row["file"]
        assert path.is_file() and sha256_file(path) == row["sha256"]
        original = tmp_path / "data" / "images" / row["file"].split("/", 1)[1]
        assert os.path.samefile(path, original), "expected a hard link on one filesystem"
    metrics = read_metrics(tmp_path / "metrics" / "split.json")
    assert metrics["per_class"] == {
        "daisy": {"test": 2, "train": 10},
        "roses": {"test": 2, "train": 8},
    }
    assert sorted(p.name for p in (split / "test").iterdir()) == ["daisy", "roses"]


def test_stage_reports_a_too_small_class_without_a_traceback(tmp_path):
    done = run_split_stage(tmp_path, {"daisy": 12, "roses": 2})
    assert done.returncode != 0
    assert "'roses' has 2" in done.stderr and "Traceback" not in done.stderr


def test_a_class_left_one_training_image_is_refused_by_name():
    # Two images pass split.min_per_class=2 and split 1/1: the heads' validation slice would
    # then fail in audit as "class 4 has 1 training image(s)", a traceback naming a number.
    rows = fake_rows({"big": 40, "tulips": 2})
    subsets = assign_subsets(rows, test_fraction=0.2, seed=0, min_per_class=2)
    with pytest.raises(SplitError, match=r"'tulips' has 1 .*split.min_per_class to 3"):
        check_training_images(rows, subsets, given=False)
    with pytest.raises(SplitError, match=r"'tulips' has 1 .*presplit=pool"):
        check_training_images(rows, subsets, given=True)
    check_training_images(rows, ["train"] * len(rows), given=False)
