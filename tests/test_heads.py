"""The three heads on synthetic bottlenecks: they learn, are deterministic, reload, and the
train_* stages write the files dvc.yaml declares."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.bottleneck_files import load_bottlenecks
from imgclf.fileio import read_csv, read_json
from imgclf.heads import HEADS, load_predictor, model_dir
from imgclf.heads.common import CURVE_COLUMNS, read_labels, round_sig
from imgclf.splitting import validation_split

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["daisy", "roses", "tulips", "sunflowers"]


def clusters(
    n_per_class: int, n_classes: int = len(CLASSES), seed: int = 0, centre_seed: int = 123
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters in 2048-d, non-negative like ReLU-pooled bottlenecks. The centres depend
    on `centre_seed` only, so sets drawn with different `seed`s share them (train vs held-out)."""
    centres = np.random.default_rng(centre_seed).gamma(1.0, 0.4, size=(n_classes, 2048))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    rng.shuffle(labels)
    features = centres[labels] + rng.normal(0.0, 0.3, size=(labels.size, 2048))
    return np.maximum(features, 0.0).astype(np.float32), labels.astype(np.int64)


def write_bottlenecks(directory: Path, n_train: int = 40, n_test: int = 10) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for subset, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = clusters(n, seed=seed)
        ids = np.array([f"{subset}/{CLASSES[c]}/{i}.jpg" for i, c in enumerate(y)])
        np.savez(directory / f"{subset}.npz", features=x, labels=y, ids=ids)
    (directory / "classes.json").write_text(json.dumps(CLASSES))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    x, y = clusters(60, seed=1)
    train_idx, val_idx = validation_split(y, 0.2, seed=0)
    x_test, y_test = clusters(25, seed=2)
    return {
        "x_train": x[train_idx],
        "y_train": y[train_idx],
        "x_val": x[val_idx],
        "y_val": y[val_idx],
        "x_test": x_test,
        "y_test": y_test,
    }


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


# --- common -----------------------------------------------------------------------------------


def test_validation_split_is_stratified_deterministic_and_disjoint() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3] * 3)
    np.random.default_rng(5).shuffle(labels)
    train_idx, val_idx = validation_split(labels, 0.1, seed=7)
    again_train, again_val = validation_split(labels, 0.1, seed=7)
    assert np.array_equal(train_idx, again_train) and np.array_equal(val_idx, again_val)
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert np.array_equal(np.union1d(train_idx, val_idx), np.arange(labels.size))
    # round(0.1 * n) per class, but every class gets at least one validation image.
    assert np.bincount(labels[val_idx]).tolist() == [5, 3, 2, 1]
    _, other_val = validation_split(labels, 0.1, seed=8)
    assert not np.array_equal(val_idx, other_val)
    assert np.bincount(labels[other_val]).tolist() == [5, 3, 2, 1]


def test_validation_split_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="validation_fraction"):
        validation_split(np.array([0, 0, 1, 1]), 0.0, seed=0)
    with pytest.raises(ValueError, match="class 1 has 1 training image"):
        validation_split(np.array([0, 0, 0, 1]), 0.25, seed=0)


def test_load_bottlenecks_checks_the_contract(tmp_path: Path) -> None:
    write_bottlenecks(tmp_path)
    train = load_bottlenecks(tmp_path, "train")
    assert train.features.shape == (160, 2048) and train.features.dtype == np.float32
    assert train.labels.dtype == np.int64 and train.classes == CLASSES
    assert train.ids[0].startswith("train/")
    with pytest.raises(FileNotFoundError, match="bottlenecks stage"):
        load_bottlenecks(tmp_path / "missing", "train")
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES[:2]))
    with pytest.raises(ValueError, match="lists 2 classes"):
        load_bottlenecks(tmp_path, "test")


def test_round_sig_keeps_six_significant_digits() -> None:
    assert round_sig(0.123456789) == 0.123457
    assert round_sig(12345.6789) == 12345.7
    assert round_sig(0.0) == 0.0


def test_tf_head_does_not_import_keras() -> None:
    tree = ast.parse((ROOT / "imgclf" / "heads" / "tf_head.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "keras" not in imported


# --- heads ------------------------------------------------------------------------------------


def test_sklearn_head_learns_is_deterministic_and_reloads(data, tmp_path: Path) -> None:
    from imgclf.heads.sklearn_head import count_parameters, save_sklearn_head, train_sklearn_head

    def train():
        return train_sklearn_head(
            data["x_train"], data["y_train"], data["x_val"], data["y_val"], n_classes=4, C=1.0
        )

    first, second = train(), train()
    probs = first.model.predict_proba(data["x_test"])
    assert _accuracy(probs, data["y_test"]) > 0.95
    assert first.summary["converged"] and first.summary["final_val_accuracy"] > 0.95
    assert np.array_equal(probs, second.model.predict_proba(data["x_test"]))
    assert count_parameters(first.model) == 4 * 2048 + 4
    save_sklearn_head(first.model, tmp_path / "sklearn_head", CLASSES)
    predict = load_predictor("sklearn", tmp_path / "sklearn_head")
    reloaded = predict(data["x_test"])
    assert reloaded.dtype == np.float32 and reloaded.shape == (100, 4)
    np.testing.assert_allclose(reloaded, probs, rtol=1e-6)
    assert read_labels(tmp_path / "sklearn_head") == CLASSES


@pytest.mark.slow
def test_tf_head_learns_is_deterministic_and_reloads(data, tmp_path: Path) -> None:
    import tensorflow as tf

    from imgclf.heads.tf_head import count_parameters, load_tf_head, save_tf_head, train_tf_head

    def train():
        return train_tf_head(
            data["x_train"], data["y_train"], data["x_val"], data["y_val"], n_classes=4,
            steps=250, batch_size=50, eval_every=100, hidden_units=32, dropout=0.3, seed=3,
            progress=False,
        )  # fmt: skip

    first, second = train(), train()
    assert [row["step"] for row in first.curve] == [100, 200, 250]
    # The shared x-axis: training images seen / training-set size.
    n = len(data["x_train"])
    assert [row["epoch"] for row in first.curve] == [s * 50 / n for s in (100, 200, 250)]
    assert first.curve == second.curve
    for a, b in zip(first.model.variables, second.model.variables, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.name
    assert int(first.model.step.numpy()) == 250 and first.summary["steps"] == 250
    assert count_parameters(first.model) == 2048 * 32 + 32 + 32 * 4 + 4
    probs = first.model.predict(tf.constant(data["x_test"])).numpy()
    assert _accuracy(probs, data["y_test"]) > 0.95
    assert first.curve[-1]["val_accuracy"] > 0.95

    save_tf_head(first.model, tmp_path / "tf_head", CLASSES)
    predict = load_predictor("tf", tmp_path / "tf_head")
    np.testing.assert_allclose(predict(data["x_test"]), probs, rtol=1e-6, atol=1e-7)
    # What the MLflow stage composes: the restored tf.function and the serving signature.
    loaded = load_tf_head(tmp_path / "tf_head")
    np.testing.assert_allclose(loaded.predict(data["x_test"]).numpy(), probs, rtol=1e-6)
    assert int(loaded.step.numpy()) == 250
    signature = loaded.signatures["serving_default"]
    assert signature.structured_input_signature[1]["bottlenecks"].shape.as_list() == [None, 2048]
    assert list(signature.structured_outputs) == ["probabilities"]


@pytest.mark.slow
def test_tf_head_default_recipe_is_retrain_py(data) -> None:
    """One softmax layer, no hidden layer: 2048 * classes + classes parameters, and it learns."""
    from imgclf.heads.tf_head import count_parameters, train_tf_head

    result = train_tf_head(
        data["x_train"], data["y_train"], data["x_val"], data["y_val"], n_classes=4,
        steps=200, eval_every=100, progress=False,
    )  # fmt: skip
    assert count_parameters(result.model) == 2048 * 4 + 4
    assert result.curve[-1]["val_accuracy"] > 0.95
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]


@pytest.mark.slow
def test_keras_head_learns_is_deterministic_and_reloads(data, tmp_path: Path) -> None:
    from imgclf.heads.keras_head import (
        count_parameters,
        load_keras_head,
        save_keras_head,
        train_keras_head,
    )

    def train():
        return train_keras_head(
            data["x_train"], data["y_train"], data["x_val"], data["y_val"], n_classes=4,
            hidden_units=32, dropout=0.3, learning_rate=1e-3, epochs=6, batch_size=32,
            early_stopping_patience=2, seed=3, progress=False,
        )  # fmt: skip

    first, second = train(), train()
    assert first.curve == second.curve
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert [row["step"] for row in first.curve] == list(range(1, first.summary["epochs"] + 1))
    assert [row["epoch"] for row in first.curve] == [float(r["step"]) for r in first.curve]
    assert count_parameters(first.model) == 2048 * 32 + 32 + 32 * 4 + 4
    probs = first.model.predict(data["x_test"], verbose=0)
    assert _accuracy(probs, data["y_test"]) > 0.95

    save_keras_head(first.model, tmp_path / "keras_head", CLASSES)
    predict = load_predictor("keras", tmp_path / "keras_head")
    np.testing.assert_allclose(predict(data["x_test"]), probs, rtol=1e-6, atol=1e-7)
    assert load_keras_head(tmp_path / "keras_head").output_shape == (None, 4)


def test_load_predictor_rejects_unknown_heads_and_missing_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown head"):
        load_predictor("torch", tmp_path)
    with pytest.raises(FileNotFoundError, match="dvc repro train@sklearn"):
        load_predictor("sklearn", tmp_path)


# --- stages -----------------------------------------------------------------------------------


def _small_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["heads"].update(validation_fraction=0.2, seed=0)
    params["train_tf"].update(steps=150, eval_every=50, batch_size=32)
    params["train_keras"].update(hidden_units=16, epochs=3, learning_rate=1e-3)
    return params


@pytest.mark.slow
def test_train_stages_write_declared_outputs(tmp_path: Path, monkeypatch) -> None:
    from stages import train

    params = _small_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_bottlenecks(tmp_path / params["paths"]["bottlenecks"])
    monkeypatch.chdir(tmp_path)
    for head in HEADS:
        train.main([head])

    models, metrics_dir = Path(params["paths"]["models"]), Path(params["paths"]["metrics"])
    assert (models / "heads" / "tf" / "saved_model.pb").is_file()
    assert (models / "heads" / "keras" / "model.keras").is_file()
    assert (models / "heads" / "sklearn" / "model.joblib").is_file()
    x_test = load_bottlenecks(params["paths"]["bottlenecks"], "test").features
    for head in HEADS:
        assert read_labels(model_dir(models, head)) == CLASSES
        metrics = read_json(metrics_dir / "train" / f"{head}.json")
        assert metrics["n_train"] == 128 and metrics["n_val"] == 32 and metrics["n_classes"] == 4
        assert metrics["train_seconds"] >= 0 and metrics["n_parameters"] > 0
        assert 0.0 <= metrics["best_val_accuracy"] <= 1.0
        probs = load_predictor(head, model_dir(models, head))(x_test)
        assert probs.shape == (40, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert read_json(metrics_dir / "train" / "tf.json")["steps"] == 150
    assert read_json(metrics_dir / "train" / "keras.json")["epochs"] <= 3
    for head, n_rows in (("tf", 3), ("keras", None)):
        rows = read_csv(metrics_dir / "curves" / f"{head}.csv")
        assert list(rows[0]) == list(CURVE_COLUMNS)
        # The format the top-level plots of dvc.yaml draw: epoch first, as a float.
        assert list(rows[0])[:5] == ["epoch", "train_loss", "val_loss", "train_accuracy",
                                     "val_accuracy"]  # fmt: skip
        assert float(rows[-1]["epoch"]) > float(rows[0]["epoch"]) > 0
        assert n_rows is None or len(rows) == n_rows
        assert all(len(value) <= 12 for row in rows for value in row.values())  # rounded
    # Every train@<model> declares the same outs: a model without a curve writes the header.
    assert (metrics_dir / "curves" / "sklearn.csv").read_text() == ",".join(CURVE_COLUMNS) + "\n"

    # A rerun rewrites the same metrics (only the wall time may differ).
    before = read_json(metrics_dir / "train" / "tf.json")
    train.main(["tf"])
    after = read_json(metrics_dir / "train" / "tf.json")
    before.pop("train_seconds"), after.pop("train_seconds")
    assert before == after


_TRAIN_AND_SAVE = """
import os
import sys
from stages import train
os.chdir(sys.argv[1])
train.main(["tf"])
train.main(["keras"])
"""


@pytest.mark.slow
def test_identical_trainings_in_fresh_processes_write_identical_model_files(tmp_path) -> None:
    """What two `dvc repro --force` of the train stages do: the same bytes in models/, so
    dvc.lock does not change and MLflow sees the same model. Keras used to
    write its save time and Python object ids, TensorFlow a random fingerprint uuid."""
    import os
    import subprocess
    import sys

    params = _small_params()
    outputs = []
    for run in ("a", "b"):
        work = tmp_path / run
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        write_bottlenecks(work / params["paths"]["bottlenecks"])
        proc = subprocess.run(
            [sys.executable, "-c", _TRAIN_AND_SAVE, str(work)],
            cwd=ROOT,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        # TF 2.21's harmless tf.data notice during fit (see keras_head._TF_DATA_NOTICE) is gone;
        # the stages' own lines are still there.
        assert b"use_unbounded_threadpool" not in proc.stderr
        assert b"train@keras: val_accuracy" in proc.stdout
        models = work / params["paths"]["models"]
        outputs.append(
            {
                str(f.relative_to(models)): f.read_bytes()
                for head in ("tf", "keras")
                for f in sorted(model_dir(models, head).rglob("*"))
                if f.is_file()
            }
        )
    assert outputs[0].keys() == outputs[1].keys()
    differ = [name for name in outputs[0] if outputs[0][name] != outputs[1][name]]
    assert differ == []
    assert "heads/keras/model.keras" in outputs[0] and "heads/tf/fingerprint.pb" in outputs[0]
