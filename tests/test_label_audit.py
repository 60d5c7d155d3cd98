"""The label audit: confident learning finds planted wrong labels among the training images,
never lists a validation image, and heads.drop_label_issues trains every model without its
list while the validation slice stays as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.bottleneck_files import load_bottlenecks
from imgclf.errors import MissingInput, UserError
from imgclf.fileio import read_csv, read_json
from imgclf.finetune.common import finetune_rows, stage_finetune_data
from imgclf.heads.common import split_train_val
from imgclf.label_audit import (
    LABEL_ISSUE_COLUMNS,
    find_label_issues,
    out_of_fold_probabilities,
    read_label_issues,
    write_label_issues,
)
from imgclf.layout import Layout
from imgclf.splitting import validation_split
from tests.helpers import make_image
from tests.test_finetune import make_acts
from tests.test_heads import CLASSES, _small_params, clusters, write_bottlenecks

ROOT = Path(__file__).resolve().parents[1]


def planted(n_per_class: int = 50, n_wrong: int = 8, seed: int = 0):
    """Clustered features whose first `n_wrong` labels (in id order) were moved one class on."""
    x, y = clusters(n_per_class, seed=seed)
    given = y.copy()
    wrong = np.arange(n_wrong)
    given[wrong] = (y[wrong] + 1) % len(CLASSES)
    ids = np.array([f"train/{CLASSES[c]}/{i:03d}.jpg" for i, c in enumerate(given)])
    return x, y, given, ids, set(ids[wrong])


def audit(x, given, ids, filter_by="prune_by_noise_rate"):
    probabilities = out_of_fold_probabilities(x, given, folds=5, seed=0, C=1.0, max_iter=500)
    return find_label_issues(ids, given, probabilities, CLASSES, filter_by=filter_by)


def test_the_audit_finds_planted_wrong_labels_and_suggests_the_true_class():
    x, truth, given, ids, wrong = planted()
    rows = audit(x, given, ids)
    flagged = {r["id"] for r in rows}
    assert flagged == wrong, (sorted(flagged - wrong), sorted(wrong - flagged))
    by_id = dict(zip(ids, truth, strict=True))
    assert all(r["suggested"] == CLASSES[by_id[r["id"]]] for r in rows)
    # The least likely label first.
    assert [r["p_label"] for r in rows] == sorted(r["p_label"] for r in rows)
    assert all(r["p_suggested"] > 0.5 > r["p_label"] for r in rows)


def test_clean_labels_give_an_empty_list_and_the_same_list_every_run():
    x, truth, _, ids, _ = planted(n_wrong=0)
    assert audit(x, truth, ids) == []
    x, _, given, ids, _ = planted(seed=3)
    assert audit(x, given, ids) == audit(x, given, ids)


def test_too_few_images_for_the_folds_is_a_clear_error():
    x, y = clusters(3)
    with pytest.raises(UserError, match=r"audit.folds=5 folds, but a class has only 3"):
        out_of_fold_probabilities(x, y, folds=5, seed=0, C=1.0, max_iter=100)


def test_the_list_round_trips_and_a_missing_one_names_the_stage(tmp_path):
    rows = [{"id": "train/a/1.jpg", "label": "a", "suggested": "b", "p_label": 0.01234,
             "p_suggested": 0.9}]  # fmt: skip
    write_label_issues(tmp_path / "label_issues.csv", rows)
    assert list(read_csv(tmp_path / "label_issues.csv")[0]) == list(LABEL_ISSUE_COLUMNS)
    assert read_label_issues(tmp_path / "label_issues.csv") == ["train/a/1.jpg"]
    with pytest.raises(MissingInput, match=r"dvc repro audit"):
        read_label_issues(tmp_path / "missing.csv")


def test_dropping_leaves_the_validation_slice_and_every_view_of_the_dropped_images_out():
    acts = make_acts(30, views=("orig", "flip"))
    rows, val_rows = finetune_rows(acts, 0.2, seed=3)
    dropped = list(acts.ids[rows][:2])
    kept, kept_val = finetune_rows(acts, 0.2, seed=3, exclude=dropped)
    np.testing.assert_array_equal(kept_val, val_rows)
    assert len(kept) == len(rows) - 2 * 2  # both views of each
    assert not set(acts.ids[kept]) & set(dropped)
    # A list made for another split names a validation image: refused, not half applied.
    with pytest.raises(UserError, match=r"1 image\(s\) that are not training images .*"
                       r"dvc repro audit"):  # fmt: skip
        finetune_rows(acts, 0.2, seed=3, exclude=[*dropped, acts.ids[val_rows[0]]])


def test_the_fine_tune_stages_drop_the_audits_list_only_when_told(tmp_path):
    acts = make_acts(30, views=("orig", "flip"))
    rows, _ = finetune_rows(acts, 0.2, seed=3)
    listed = list(dict.fromkeys(acts.ids[rows]))[:3]
    layout = Layout.of(metrics=tmp_path)
    write_label_issues(layout.label_issues(), [
        {"id": i, "label": "daisy", "suggested": "rose", "p_label": 0.0, "p_suggested": 1.0}
        for i in listed
    ])  # fmt: skip
    shared = {"validation_fraction": 0.2, "seed": 3, "drop_label_issues": False}
    kept, n_dropped = stage_finetune_data(acts, layout, shared)
    assert n_dropped == 0 and len(kept.y_train) == len(rows)
    dropped, n_dropped = stage_finetune_data(acts, layout, {**shared, "drop_label_issues": True})
    assert n_dropped == 3 and dropped.n_train_images == kept.n_train_images - 3
    np.testing.assert_array_equal(dropped.val_rows, kept.val_rows)


@pytest.mark.slow
def test_the_stage_audits_training_images_only_and_the_models_train_without_its_list(
    tmp_path, monkeypatch, capsys
):
    from stages import audit as audit_stage
    from stages import train

    params = _small_params()
    params["audit"]["folds"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    bottlenecks = tmp_path / params["paths"]["bottlenecks"]
    write_bottlenecks(bottlenecks)
    # Plant wrong labels: move the first five training images one class on.
    with np.load(bottlenecks / "train.npz") as data:
        x, y, ids = data["features"], data["labels"].copy(), data["ids"]
    y[:5] = (y[:5] + 1) % len(CLASSES)
    np.savez(bottlenecks / "train.npz", features=x, labels=y, ids=ids)
    for i in ids[:2]:  # thumbnails for two; the rest are drawn as unreadable placeholders
        make_image(tmp_path / params["paths"]["split"] / i, size=(40, 30))
    monkeypatch.chdir(tmp_path)

    audit_stage.main()
    assert "could not be read" in capsys.readouterr().err  # the thumbnails not written above
    metrics = Path(params["paths"]["metrics"])
    listed = read_label_issues(metrics / "label_issues.csv")
    train_data = load_bottlenecks(params["paths"]["bottlenecks"], "train")
    fit_idx, val_idx = validation_split(train_data.labels, 0.2, 0)
    assert not set(listed) & set(train_data.ids[val_idx])  # never a validation image
    planted_outside_val = set(ids[:5]) - set(train_data.ids[val_idx])
    assert planted_outside_val and planted_outside_val <= set(listed)
    summary = read_json(metrics / "audit.json")
    assert summary["images_audited"] == len(fit_idx) and summary["label_issues"] == len(listed)
    assert (metrics / "label_issues.png").read_bytes()[:4] == b"\x89PNG"

    train.main(["sklearn"])
    assert read_json(metrics / "train" / "sklearn.json")["n_label_issues_dropped"] == 0
    params["heads"]["drop_label_issues"] = True
    Path("params.yaml").write_text(yaml.safe_dump(params))
    train.main(["sklearn"])
    trained = read_json(metrics / "train" / "sklearn.json")
    assert trained["n_label_issues_dropped"] == len(listed)
    assert trained["n_train"] == len(fit_idx) - len(listed) and trained["n_val"] == len(val_idx)
    x_train = split_train_val(train_data, 0.2, 0, listed)[0]
    assert len(x_train) == trained["n_train"]
    # Without the list, the drop says which stage makes it.
    (metrics / "label_issues.csv").unlink()
    with pytest.raises(SystemExit, match=r"label_issues.csv not found.*dvc repro audit"):
        train.main(["sklearn"])
