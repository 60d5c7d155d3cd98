"""The evaluate stage: its reports (files, content, contact sheet), determinism, the accuracy
gate, and the whole stage on tiny real heads."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imgclf.bottleneck_files import Bottlenecks
from imgclf.contact_sheet import (
    CELL_H,
    CELL_W,
    HEADER_H,
    PAD,
    SHEET_COLUMNS,
    THUMB,
    contact_sheet,
    contact_sheet_size,
)
from imgclf.fileio import read_csv, read_json, read_metrics, write_json
from imgclf.reports import lines_of_code
from imgclf.scoring import HEADS_SOURCE_DIR, evaluate_predictions
from tests.helpers import make_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["daisy", "roses", "tulips"]
N_PER_CLASS = 12


def make_test_set(root: Path) -> Bottlenecks:
    """36 test images in data/split/test/<class>/, listed in a shuffled (non-id) order."""
    ids, labels = [], []
    for c, name in enumerate(CLASSES):
        for i in range(N_PER_CLASS):
            image_id = f"test/{name}/{i:02d}.jpg"
            make_image(root / "data/split" / image_id, size=(60, 40), seed=100 * c + i)
            ids.append(image_id)
            labels.append(c)
    order = np.random.default_rng(0).permutation(len(ids))
    return Bottlenecks(
        features=np.zeros((len(ids), 2048), np.float32),
        labels=np.array(labels, np.int64)[order],
        ids=np.array(ids)[order],
        classes=list(CLASSES),
    )


def probabilities(test: Bottlenecks, wrong: list[int], confidence: float = 0.7) -> np.ndarray:
    """Probabilities that put `confidence` on the true class, except on the images at the
    positions in `wrong`, which go to the next class, with confidences decreasing by position."""
    k = len(test.classes)
    predicted = test.labels.copy()
    conf = np.full(len(predicted), confidence)
    for rank, i in enumerate(wrong):
        predicted[i] = (predicted[i] + 1) % k
        conf[i] = 0.9 - 0.01 * rank
    probs = np.tile(((1 - conf) / (k - 1))[:, None], (1, k))
    probs[np.arange(len(predicted)), predicted] = conf
    return probs


def write_train_metrics(metrics: Path) -> None:
    write_json(metrics / "train/tf.json", {"train_seconds": 12.34, "n_parameters": 6147,
                                           "steps": 4000})  # fmt: skip
    write_json(metrics / "train/keras.json", {"train_seconds": 20.0, "n_parameters": 2100227,
                                              "epochs": 30, "steps": 2790})  # fmt: skip
    # sklearn's metrics missing on purpose: the table shows dashes instead of failing.


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Bottlenecks, dict[str, np.ndarray]]:
    test = make_test_set(tmp_path)
    write_train_metrics(tmp_path / "metrics")
    # Positions (in the shuffled order) each head gets wrong, so that tf vs keras has
    # b = 7 (5..11: tf right, keras wrong) and c = 5 (2, 3, 4, 12, 13: the reverse).
    tf_wrong = [0, 1, 2, 3, 4, 12, 13]
    keras_wrong = [0, 1, *range(5, 12)]
    probs = {
        "tf": probabilities(test, tf_wrong),
        "keras": probabilities(test, keras_wrong),
        "sklearn": probabilities(test, []),
    }
    return tmp_path, test, probs


def run_core(root: Path, test: Bottlenecks, probs, min_accuracy: float = 0.5, sheet_max: int = 48):
    cwd = Path.cwd()
    os.chdir(root)  # the stage writes split-relative paths, as under `dvc repro`
    try:
        return evaluate_predictions(
            test,
            probs,
            metrics_dir="metrics",
            split_dir="data/split",
            heads_source_dir=HEADS_SOURCE_DIR,
            min_accuracy=min_accuracy,
            sheet_max=sheet_max,
        )
    finally:
        os.chdir(cwd)


EVALUATE_OUTPUTS = ("comparison.md", "evaluate", "confusion", "misclassified")


def output_files(metrics: Path) -> dict[str, bytes]:
    """Everything the evaluate stage writes under `metrics` (not the train stages' files)."""
    return {
        p.relative_to(metrics).as_posix(): p.read_bytes()
        for p in sorted(metrics.rglob("*"))
        if p.is_file() and p.relative_to(metrics).parts[0] in EVALUATE_OUTPUTS
    }


def test_reports_are_complete_and_consistent(project) -> None:
    root, test, probs = project
    evaluation = run_core(root, test, probs)
    metrics = root / "metrics"
    expected = {"comparison.md", "evaluate/comparison.json", "evaluate/comparison.info.json"} | {
        f"{kind}/{head}.{ext}"
        for head in probs
        for kind, ext in [
            ("evaluate", "json"),
            ("evaluate", "info.json"),
            ("confusion", "csv"),
            ("confusion", "png"),
            ("misclassified", "csv"),
            ("misclassified", "png"),
        ]
    }
    assert set(output_files(metrics)) == expected

    tf = read_json(metrics / "evaluate/tf.json")
    assert tf["n_test"] == 36 and tf["accuracy"] == round(29 / 36, 6)
    assert tf["ci_low"] < tf["accuracy"] < tf["ci_high"]
    assert tf["per_class"]["roses"]["support"] == N_PER_CLASS

    # Confusion CSV: one row per image, class names, in image-id order.
    rows = read_csv(metrics / "confusion/tf.csv")
    by_id = np.argsort(test.ids)
    assert [r["actual"] for r in rows] == [CLASSES[test.labels[i]] for i in by_id]
    wrong = [r for r in rows if r["actual"] != r["predicted"]]
    assert len(wrong) == 7

    # Misclassified CSV: most confident first, paths into the split tree.
    mis = read_csv(metrics / "misclassified/tf.csv")
    assert list(mis[0]) == ["id", "path", "actual", "predicted", "confidence", "p_actual"]
    assert len(mis) == 7 and mis[0]["confidence"] == "0.9000"
    assert [float(r["confidence"]) for r in mis] == sorted(
        (float(r["confidence"]) for r in mis), reverse=True
    )
    assert mis[0]["id"] == test.ids[0] and mis[0]["path"] == f"data/split/{test.ids[0]}"
    assert (root / mis[0]["path"]).is_file()
    assert read_csv(metrics / "misclassified/sklearn.csv") == []

    with Image.open(metrics / "confusion/tf.png") as img:
        assert img.format == "PNG" and img.width > 300
    assert evaluation.summary.misclassified == {"tf": 7, "keras": 9, "sklearn": 0}


def test_comparison_table_and_mcnemar(project) -> None:
    root, test, probs = project
    evaluation = run_core(root, test, probs)
    pair = {(t.a, t.b): t for t in evaluation.tests}
    # tf right & keras wrong: 5..11 = 7 images; tf wrong & keras right: 2, 3, 4, 12, 13 = 5.
    assert (pair["tf", "keras"].a_only, pair["tf", "keras"].b_only) == (7, 5)

    md = (root / "metrics/comparison.md").read_text(encoding="utf-8")
    assert "- TF vs Keras: 7 vs 5 discordant, p = 0.77 (Holm: p = 0.77): not significant." in md
    assert (
        "- Keras vs scikit-learn: 0 vs 9 discordant, p = 0.0039 (Holm: p = 0.012): significant, "
    ) in md
    assert "significant when Holm's adjusted p over the 3 pairs below is < 0.05" in md
    loc = lines_of_code(HEADS_SOURCE_DIR / "tf_head.py")
    assert loc and loc > 10
    # 29 right at p = 0.7; 7 wrong, giving the true class (1 - (0.9 - 0.01 r)) / 2, r = 0..6.
    log_loss = (29 * -math.log(0.7) - sum(math.log((0.1 + 0.01 * r) / 2) for r in range(7))) / 36
    assert f"{log_loss:.3f}" == "0.821"
    tf_row = next(line for line in md.splitlines() if line.startswith("| TF |"))
    assert tf_row == (
        f"| TF | 0.806 [0.650, 0.902] | 0.803 | 0.821 | 12.3 s | 6,147 | 4,000 steps | {loc} |"
    )
    keras_row = next(line for line in md.splitlines() if line.startswith("| Keras |"))
    assert "| 20.0 s | 2,100,227 | 30 epochs (2,790 steps) |" in keras_row
    sk_row = next(line for line in md.splitlines() if line.startswith("| scikit-learn |"))
    assert "| – | – | – |" in sk_row

    comparison = read_metrics(root / "metrics/evaluate/comparison.json")
    assert list(comparison) == ["keras_vs_sklearn", "tf_vs_keras", "tf_vs_sklearn"]
    assert comparison["tf_vs_keras"] == {
        "b": 7,
        "c": 5,
        "n_discordant": 12,
        "p_value": 0.774414,
        "mid_p": 0.581055,
        "p_holm": 0.774414,
        "significant": False,
    }


def test_reruns_are_byte_identical(project, tmp_path_factory) -> None:
    root, test, probs = project
    run_core(root, test, probs)
    first = output_files(root / "metrics")
    run_core(root, test, probs)
    assert output_files(root / "metrics") == first
    # Same predictions listed in another order: same reports (everything is sorted by id).
    order = np.random.default_rng(1).permutation(len(test.ids))
    shuffled = Bottlenecks(test.features[order], test.labels[order], test.ids[order], test.classes)
    run_core(root, shuffled, {h: p[order] for h, p in probs.items()})
    assert output_files(root / "metrics") == first


def test_accuracy_gate_names_the_heads_after_writing(project) -> None:
    root, test, probs = project
    evaluation = run_core(root, test, probs, min_accuracy=0.8)
    assert evaluation.failures == ["keras 0.7500"]
    assert (root / "metrics/comparison.md").is_file()
    assert (root / "metrics/misclassified/keras.png").is_file()


def _bbox_of_ink(img: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    region = np.asarray(img.crop(box).convert("L"))
    ys, xs = np.nonzero(region < 250)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_contact_sheet_layout_exif_and_unreadable(tmp_path: Path) -> None:
    # An 80x40 photo stored sideways (EXIF orientation 6): shown upright it is 40 wide, 80 high.
    red = Image.new("RGB", (80, 40), (200, 0, 0))
    exif = red.getexif()
    exif[0x0112] = 6
    red.save(tmp_path / "sideways.jpg", exif=exif)
    make_image(tmp_path / "big.jpg", size=(400, 300), seed=1)
    rows = [
        {"id": "test/roses/sideways.jpg", "path": str(tmp_path / "sideways.jpg"),
         "actual": "roses", "predicted": "tulips", "confidence": 0.93},
        {"id": "test/daisy/big.jpg", "path": str(tmp_path / "big.jpg"),
         "actual": "daisy", "predicted": "sunflowers", "confidence": 0.5},
        {"id": "test/daisy/gone.jpg", "path": str(tmp_path / "gone.jpg"),
         "actual": "daisy", "predicted": "roses", "confidence": 0.4},
    ] * 3  # fmt: skip
    sheet = contact_sheet(rows, "TF", max_images=8)
    assert (sheet.shown, sheet.unreadable) == (8, 2)
    img = Image.open(io.BytesIO(sheet.png))
    assert img.size == contact_sheet_size(8) == (SHEET_COLUMNS * CELL_W, HEADER_H + 2 * CELL_H)

    # Cell 0: the upright thumbnail, centred in its THUMB box.
    thumb_box = (0, HEADER_H + PAD, CELL_W, HEADER_H + PAD + THUMB)
    x0, y0, x1, y1 = _bbox_of_ink(img, thumb_box)
    assert (x1 - x0, y1 - y0) == (40, 80)
    # Cell 1: a large image shrunk to fit THUMB x THUMB, aspect kept (400x300 -> 128x96).
    x0, y0, x1, y1 = _bbox_of_ink(img, (CELL_W, HEADER_H + PAD, 2 * CELL_W, HEADER_H + PAD + THUMB))
    assert (x1 - x0, y1 - y0) == (THUMB, 96)
    # The labels below the thumbnails and the header are drawn (dark pixels).
    label_box = (0, HEADER_H + PAD + THUMB, CELL_W, HEADER_H + CELL_H)
    assert _bbox_of_ink(img, label_box)[2] > 60
    assert _bbox_of_ink(img, (0, 0, img.width, HEADER_H))[2] > 100

    empty = Image.open(io.BytesIO(contact_sheet([], "Keras", 48).png))
    assert empty.size == contact_sheet_size(0) == (SHEET_COLUMNS * CELL_W, HEADER_H)


def test_lines_of_code_skips_comments_docstrings_and_blank_lines(tmp_path: Path) -> None:
    source = '''"""Module docstring
over two lines."""

# a comment
import os  # trailing comment


def f(x):
    """Docstring."""
    text = """a string
    that is code"""
    return x  # done
'''
    path = tmp_path / "m.py"
    path.write_text(source)
    assert lines_of_code(path) == 5  # import, def, text (2 lines), return
    assert lines_of_code(tmp_path / "missing.py") is None


# --- the whole stage on tiny real heads -----------------------------------------------------


def _clusters(n_per_class: int, seed: int, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(42).gamma(1.0, 0.4, size=(k, 2048))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    features = centres[labels] + rng.normal(0.0, 0.3, size=(labels.size, 2048))
    return np.maximum(features, 0.0).astype(np.float32), labels.astype(np.int64)


@pytest.mark.slow
def test_stage_on_tiny_real_heads(tmp_path: Path) -> None:
    from imgclf.heads import model_dir
    from imgclf.heads.common import write_training_metrics
    from imgclf.heads.keras_head import count_parameters as keras_params
    from imgclf.heads.keras_head import save_keras_head, train_keras_head
    from imgclf.heads.sklearn_head import count_parameters as sk_params
    from imgclf.heads.sklearn_head import save_sklearn_head, train_sklearn_head
    from imgclf.heads.tf_head import count_parameters as tf_params
    from imgclf.heads.tf_head import save_tf_head, train_tf_head
    from imgclf.scoring import score_models

    x_train, y_train = _clusters(20, seed=1)
    x_val, y_val = _clusters(4, seed=2)
    x_test, y_test = _clusters(6, seed=3)
    # Real flower-like layout: test ids in the split tree, images on disk for the sheets.
    ids = np.array([f"test/{CLASSES[c]}/{i:02d}.jpg" for i, c in enumerate(y_test)])
    for i, image_id in enumerate(ids):
        make_image(tmp_path / "data/split" / image_id, size=(50, 40), seed=i)
    bottlenecks = tmp_path / "data/bottlenecks"
    bottlenecks.mkdir(parents=True)
    np.savez(bottlenecks / "test.npz", features=x_test, labels=y_test, ids=ids)
    (bottlenecks / "classes.json").write_text(json.dumps(CLASSES))

    models, metrics = tmp_path / "models", tmp_path / "metrics"
    common = dict(n_classes=3, seed=0)
    trained = [
        ("tf", train_tf_head(x_train, y_train, x_val, y_val, steps=30, batch_size=20,
                             eval_every=10, progress=False, **common), save_tf_head, tf_params),
        ("keras", train_keras_head(x_train, y_train, x_val, y_val, hidden_units=16, epochs=2,
                                   batch_size=16, progress=False, **common),
         save_keras_head, keras_params),
        ("sklearn", train_sklearn_head(x_train, y_train, x_val, y_val, max_iter=200, **common),
         save_sklearn_head, sk_params),
    ]  # fmt: skip
    for head, result, save, count in trained:
        save(result.model, model_dir(models, head), CLASSES)
        write_training_metrics(metrics, head, result, n_parameters=count(result.model),
                               n_train=len(y_train), n_val=len(y_val), n_classes=3)  # fmt: skip

    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        evaluation = score_models(bottleneck_dir="data/bottlenecks", models_dir="models",
                                  metrics_dir="metrics", split_dir="data/split", min_accuracy=0.0,
                                  sheet_max=4)  # fmt: skip
    finally:
        os.chdir(cwd)
    assert evaluation.failures == []
    first = output_files(metrics)
    assert len(first) == 21
    for head in ("tf", "keras", "sklearn"):
        assert read_json(metrics / f"evaluate/{head}.json")["n_test"] == len(y_test)
    md = first["comparison.md"].decode()
    assert "| TF |" in md and "steps" in md and "TF vs Keras:" in md

    # `python -m stages.evaluate` as DVC runs it, with a bar no head can pass: exit 1 with the
    # heads named, and the same (byte-identical) reports already written.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["min_accuracy"] = 1.01
    params["evaluate"]["misclassified_sheet_max"] = 4
    # A heads-only result: no fine-tuned model in the report, no activations read.
    params["finetune_models"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name in output_files(metrics):
        (metrics / name).unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "evaluate.min_accuracy = 1.01" in proc.stderr
    # McNemar's b and c in words, not as bare letters.
    assert "evaluate: tf vs keras: " in proc.stdout and "only by keras: " in proc.stdout
    assert "b=" not in proc.stdout
    for head in ("tf", "keras", "sklearn"):
        assert f"{head} " in proc.stderr.split("min_accuracy = 1.01")[1]
    assert output_files(metrics) == first


# --------------------------------------------------------------------------- fine-tuned models


def write_test_activations(folder: Path, ids, labels, views=("orig",)) -> None:
    """The activations stage's test files (view-major rows), for the alignment check."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    np.save(folder / "test.npy", np.zeros((n * len(views), 1, 1, 2), np.float16))
    np.savez(
        folder / "test_index.npz",
        ids=np.tile(np.asarray(ids), len(views)),
        labels=np.tile(np.asarray(labels, np.int64), len(views)),
        view=np.repeat(np.arange(len(views)), n),
        views=np.array(views),
    )


def test_test_activations_must_be_the_bottlenecks_images_in_order(tmp_path: Path) -> None:
    from imgclf.errors import UserError
    from imgclf.predictions import aligned_test_activations

    ids = np.array([f"test/{c}/{i}.jpg" for c in CLASSES for i in range(3)])
    labels = np.repeat(np.arange(3), 3)
    test = Bottlenecks(np.zeros((9, 2048), np.float32), labels, ids, list(CLASSES))
    good = tmp_path / "good"
    write_test_activations(good, ids, labels, views=("flip", "orig"))
    acts = aligned_test_activations(test, good)
    np.testing.assert_array_equal(acts.ids[acts.of_view("orig")], ids)

    swapped = ids.copy()
    swapped[[2, 5]] = swapped[[5, 2]]
    for name, (a_ids, a_labels, views), match in (
        (
            "order",
            (swapped, labels, ("orig",)),
            r"from row 2 on \(test/roses/2.jpg in the activations, test/daisy/2.jpg in",
        ),
        ("fewer", (ids[:-1], labels[:-1], ("orig",)), r"lists 8 test images .* bottlenecks 9"),
        ("labels", (ids, (labels + 1) % 3, ("orig",)), r"labels test image test/daisy/0.jpg"),
        ("views", (ids, labels, ("flip",)), r"not `orig`.*activations\.test_views"),
    ):
        write_test_activations(tmp_path / name, a_ids, a_labels, views)
        with pytest.raises(UserError, match=match) as e:
            aligned_test_activations(test, tmp_path / name)
        assert "test_index.npz" in str(e.value) and "dvc repro" in str(e.value)


@pytest.mark.slow
def test_fine_tuned_models_are_in_the_same_report(tmp_path_factory) -> None:
    """The tiny pipeline result (tests/test_tracking.py: real stages, five models): the
    fine-tuned models are rows of comparison.md, with confusion matrices and contact sheets, and
    McNemar pairs them with every other model, their frozen heads and each other included."""
    from imgclf.registry import pipeline_models
    from imgclf.reports import training_length
    from tests.test_tracking import tiny_result

    workdir, params = tiny_result(tmp_path_factory)
    metrics = workdir / "metrics"
    models = pipeline_models(params)
    assert models[-2:] == ["finetune_tf", "finetune_keras"]
    md = (metrics / "comparison.md").read_text()
    assert "| TF fine-tuned |" in md and "| Keras fine-tuned |" in md
    assert "TF fine-tuned vs Keras fine-tuned:" in md and "TF vs TF fine-tuned:" in md
    pairs = read_metrics(metrics / "evaluate/comparison.json")
    assert len(pairs) == len(models) * (len(models) - 1) // 2
    assert {"finetune_tf_vs_finetune_keras", "tf_vs_finetune_tf", "keras_vs_finetune_keras"} <= (
        set(pairs)
    )
    n_test = read_json(metrics / "evaluate/tf.json")["n_test"]
    for head in ("finetune_tf", "finetune_keras"):
        ev = read_json(metrics / f"evaluate/{head}.json")
        assert ev["n_test"] == n_test and 0 <= ev["accuracy"] <= 1
        assert len(read_csv(metrics / f"confusion/{head}.csv")) == n_test
        assert (metrics / f"confusion/{head}.png").is_file()
        assert (metrics / f"misclassified/{head}.png").is_file()
        train = read_json(metrics / f"train/{head}.json")
        assert f"| {training_length(train)} |" in md and "epoch" in training_length(train)
        # The curve CSV: the shared columns, then the per-block gradient norms.
        header = (metrics / f"curves/{head}.csv").read_text().splitlines()[0].split(",")
        assert header == ["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy",
                          "step", "gradient_norm_mixed_9", "gradient_norm_mixed_10",
                          "gradient_norm_head"]  # fmt: skip
