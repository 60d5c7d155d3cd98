"""LiteRT (TFLite) export (imgclf/litert.py): real conversions, run by the LiteRT interpreter.

The model is a real `EndToEndModel` (the tf-2015 preprocessing code, a real retrain.py TF head
trained and saved by the project's own functions) on a small Keras backbone instead of
Inception V3: converting Inception V3 three times (with int8 calibration) takes about a
minute, and the conversion code path is the same. The full-size figures come from
bench/litert.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.errors import ParamsError, StageFailed
from tests.helpers import make_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["daisy", "roses"]
PER_CLASS = 6


def _tiny_backbone():
    """A small deterministic conv net: uint8 images -> [N, 2048] features, as Inception's."""
    import keras

    from imgclf.inception import PREPROCESSING, Backbone

    keras.utils.set_random_seed(0)
    inputs = keras.Input((299, 299, 3))
    x = keras.layers.Conv2D(16, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=4, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(2048, activation="relu")(x)
    model = keras.Model(inputs, x)
    model.trainable = False
    return Backbone(model, "tf-2015", "0" * 64, PREPROCESSING["tf-2015"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list[Path], np.ndarray, bool]:
    """Real flower photos when ../shared has them (PER_CLASS of each of CLASSES), generated
    images otherwise; and whether they are real."""
    from tests.conftest import SHARED

    flowers = SHARED / "flower_photos"
    if flowers.is_dir():
        paths = [p for c in CLASSES for p in sorted((flowers / c).glob("*.jpg"))[:PER_CLASS]]
        return paths, np.repeat(np.arange(len(CLASSES)), PER_CLASS), True
    root = tmp_path_factory.mktemp("images")
    paths = [
        make_image(root / f"{c}_{i}.jpg", size=(80 + 7 * i, 60 + 5 * i), seed=10 * k + i)
        for k, c in enumerate(CLASSES)
        for i in range(PER_CLASS)
    ]
    return paths, np.repeat(np.arange(len(CLASSES)), PER_CLASS), False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, images):
    """(EndToEndModel, the images' preprocessed pixels) with a TF head trained on them."""
    import tensorflow as tf

    from imgclf.end_to_end import EndToEndModel
    from imgclf.heads import tf_head
    from imgclf.litert import preprocessed_pixels

    backbone = _tiny_backbone()
    paths, labels, _ = images
    pixels = np.concatenate(list(preprocessed_pixels(paths, backbone.preprocess)))
    features = backbone.model(tf.constant(pixels)).numpy()
    result = tf_head.train_tf_head(
        features, labels, features, labels, n_classes=len(CLASSES), steps=300, batch_size=12,
        eval_every=300, learning_rate=0.5, progress=False,
    )  # fmt: skip
    head_dir = tmp_path_factory.mktemp("head") / "tf"
    tf_head.save_tf_head(result.model, head_dir, CLASSES)
    head, head_fn = tf_head.graph_head(head_dir)
    model = EndToEndModel(backbone, head, head_fn, CLASSES, "tf")
    return model, pixels


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny, images):
    """The three files of the tiny model, int8 calibrated on the images."""
    from imgclf.litert import PRECISIONS, export, preprocessed_pixels

    model, _ = tiny
    out = tmp_path_factory.mktemp("litert")
    paths = images[0]
    return {
        p: export(model, out, "tf", p, lambda: preprocessed_pixels(paths, model.preprocess))
        for p in PRECISIONS
    }


def _tf_probabilities(model, pixels: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return model.probabilities_of_preprocessed(tf.constant(pixels)).numpy()


def test_the_fixed_input_graph_is_the_end_to_end_model(tiny, images):
    # The file's graph starts after preprocessing: fed `preprocess`'s pixels it must give what
    # the uint8 model gives on the decoded image.
    import tensorflow as tf

    from imgclf.images import load_rgb

    model, pixels = tiny
    whole = np.concatenate([model(tf.constant(load_rgb(p)[None])).numpy() for p in images[0]])
    np.testing.assert_allclose(_tf_probabilities(model, pixels), whole, atol=1e-6)


def test_float32_file_matches_tensorflow(tiny, exported):
    from imgclf.litert import predict

    model, pixels = tiny
    got = predict(exported["float32"].tflite, list(pixels[:, None]))
    np.testing.assert_allclose(got, _tf_probabilities(model, pixels), atol=1e-4)
    assert got.shape == (len(pixels), len(CLASSES))


def test_float16_file_is_close_and_half_the_size(tiny, exported):
    from imgclf.litert import predict

    model, pixels = tiny
    got = predict(exported["float16"].tflite, list(pixels[:, None]))
    np.testing.assert_allclose(got, _tf_probabilities(model, pixels), atol=1e-2)
    ratio = exported["float32"].size_bytes / exported["float16"].size_bytes
    assert 1.7 < ratio < 2.1, ratio


def test_int8_file_is_much_smaller_and_full_integer(exported):
    from imgclf.litert import load_interpreter

    assert exported["float32"].size_bytes / exported["int8"].size_bytes > 3.0
    interpreter = load_interpreter(exported["int8"].tflite)
    # Full-integer: every convolution and matmul weight is int8 (float input/output kept).
    kinds = {d["dtype"].__name__ for d in interpreter.get_tensor_details()}
    assert "int8" in kinds
    (inp,) = interpreter.get_input_details()
    assert inp["dtype"].__name__ == "float32" and list(inp["shape"]) == [1, 299, 299, 3]


def test_int8_agrees_with_tensorflow_on_real_photos(tiny, exported, images):
    from imgclf.litert import compare, predict

    if not images[2]:
        pytest.skip("real flower photos not found in ../shared: agreement on noise means little")
    model, pixels = tiny
    got = predict(exported["int8"].tflite, list(pixels[:, None]))
    scores = compare(got, _tf_probabilities(model, pixels), images[1])
    assert scores["top1_agreement"] >= 10 / 12, scores
    assert scores["max_abs_prob_diff"] < 0.2, scores


def test_labels_and_sidecar_files(exported):
    from imgclf.litert import read_labels_file

    f = exported["int8"]
    assert f.tflite.name == "tf-int8.tflite"
    assert f.labels.read_text(encoding="utf-8") == "daisy\nroses\n"
    assert read_labels_file(f.labels) == CLASSES
    info = json.loads(f.info.read_text(encoding="utf-8"))
    assert info["labels"] == CLASSES
    assert info["input"]["shape"] == [1, 299, 299, 3]
    assert (info["input"]["mean"], info["input"]["std"]) == (128.0, 128.0)


def test_a_wrong_input_shape_is_refused(exported):
    from imgclf.litert import predict

    with pytest.raises(ValueError, match=r"input 0 has shape \(1, 64, 64, 3\).*EndToEndModel"):
        predict(exported["float32"].tflite, [np.zeros((1, 64, 64, 3), np.float32)])


def test_stage_scoring_writes_metrics_and_names_a_failed_file(tiny, images, tmp_path):
    from imgclf.litert import export_and_score, markdown_table

    model, pixels = tiny
    paths, labels, _ = images
    common = dict(
        build_model=lambda name: model,
        models=["tf"],
        out_dir=tmp_path,
        test_paths=paths[:4],
        test_labels=labels,
        reference={"tf": _tf_probabilities(model, pixels)},
        num_threads=1,
    )
    metrics = export_and_score(precisions=["float32"], calibration_paths=[], **common)
    row = metrics["files"]["tf-float32"]
    assert metrics["test_images"] == 4 and row["top1_agreement"] == 1.0
    assert row["max_abs_prob_diff"] < 1e-4 and row["size_ratio_vs_float32"] == 1.0
    assert all(isinstance(v, float) for v in row.values())  # DVC metrics: numbers only
    assert "| `tf-float32.tflite` |" in markdown_table(metrics)
    # int8 with no calibration image: the converter fails, and the message says which file.
    failed = "LiteRT export of tf at int8 failed: ValueError: int8 conversion got no calibration"
    with pytest.raises(StageFailed, match=failed):
        export_and_score(precisions=["int8"], calibration_paths=[], **common)


@pytest.mark.slow
def test_a_fine_tuned_model_exports_at_its_own_input_size(tmp_path_factory, tmp_path):
    # The tiny pipeline result's activations are at 331x331: the file's fixed input, the
    # sidecar and the pixels the stage scores it on must all be that size, not the 299 of the
    # heads (the real Inception V3 here, converted once at float32: ~20 s).
    from imgclf.activations import load_activations
    from imgclf.end_to_end import Builder
    from imgclf.finetune.common import predict_images
    from imgclf.heads import load_predictor, model_dir
    from imgclf.litert import export_and_score
    from tests.test_tracking import tiny_result

    workdir, params = tiny_result(tmp_path_factory)
    acts = load_activations(workdir / params["paths"]["activations"], "test")
    orig = acts.of_view("orig")[:2]
    folder = model_dir(workdir / params["paths"]["models"], "finetune_tf")
    reference = predict_images(load_predictor("finetune_tf", folder), acts, test_time_flip=False)
    metrics = export_and_score(
        build_model=lambda name: Builder(workdir / params["paths"]["backbone"])(folder, name),
        models=["finetune_tf"], precisions=["float32"], out_dir=tmp_path, calibration_paths=[],
        test_paths=[workdir / params["paths"]["split"] / i for i in acts.ids[orig]],
        test_labels=acts.labels[orig], reference={"finetune_tf": reference[:2]}, num_threads=1,
    )  # fmt: skip
    sidecar = json.loads((tmp_path / "finetune_tf-float32.json").read_text())
    assert sidecar["input"]["shape"] == [1, 331, 331, 3]
    assert "331x331" in sidecar["input"]["pixels"] and "_331:" in sidecar["preprocessing"]
    assert metrics["files"]["finetune_tf-float32"]["max_abs_prob_diff"] < 1e-4


PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("precisions", ["float32", "bfloat16"], "values of float32, float16, int8, found"),
        ("precisions", [], "a non-empty list"),
        ("precisions", ["int8", "int8"], "distinct"),
        ("num_threads", 0, "expected a positive integer, found 0"),
    ],
)
def test_bad_litert_params_name_the_key(key, value, message):
    from imgclf.params import LitertParams

    params = copy.deepcopy(PARAMS)
    params["litert"][key] = value
    with pytest.raises(ParamsError, match=f"params.yaml: litert.{key}: .*{message}"):
        LitertParams.from_params(params)


def test_the_repository_litert_params_parse():
    from imgclf.params import LitertParams

    assert LitertParams.from_params(PARAMS).as_kwargs() == PARAMS["litert"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("sklearn", "not servable end to end"),
        ("resnet", "not a registered model"),
        ("finetune_keras", "not trained by this pipeline"),
    ],
)
def test_unknown_or_unservable_models_are_refused(name, why):
    from imgclf.litert import check_models

    assert check_models(["tf"], ["tf", "keras", "sklearn"]) == ["tf"]
    with pytest.raises(ParamsError, match=f"litert.models: .*{name!r}, {why}"):
        check_models(["tf", name], ["tf", "keras", "sklearn"])


def test_litert_converts_no_bfloat16_convolution():
    """Why the export stage converts a bfloat16-trained fine-tuned model with its blocks
    rebuilt in float32 (tests/test_finetune.py checks that rebuild converts): if a TensorFlow
    release converts this, the rebuild could go."""
    import tensorflow as tf

    kernel = tf.constant(np.ones((3, 3, 4, 2), np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 4], tf.float32)])
    def conv(x):
        y = tf.nn.conv2d(tf.cast(x, tf.bfloat16), tf.cast(kernel, tf.bfloat16), 1, "SAME")
        return tf.cast(y, tf.float32)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([conv.get_concrete_function()])
    with pytest.raises(Exception, match="Conv2D"):
        converter.convert()


def test_an_unknown_precision_is_refused_by_the_converter(tiny):
    from imgclf.litert import convert

    with pytest.raises(ParamsError, match=r"litert\.precisions: expected some of float32"):
        convert(tiny[0], "bfloat16")


@pytest.mark.parametrize("log_models", [True, False])
def test_track_logs_the_export_to_the_parent_run(tiny, images, tmp_path, monkeypatch, log_models):
    # A real MLflow store; the export stage's outputs as `export_and_score` writes them.
    import mlflow

    from imgclf.fileio import write_json
    from imgclf.layout import Layout
    from imgclf.litert import export_and_score, markdown_table
    from imgclf.tracking.pipeline_run import _log_litert
    from imgclf.tracking.store import configure_store, get_or_create_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model, pixels = tiny
    layout = Layout.of(metrics=tmp_path / "metrics", models=tmp_path / "models")
    layout.metrics.mkdir()
    metrics = export_and_score(
        build_model=lambda name: model, models=["tf"], precisions=["float32"],
        out_dir=layout.litert_dir("tf"), calibration_paths=[], test_paths=images[0][:2],
        test_labels=images[1], reference={"tf": _tf_probabilities(model, pixels[:2])},
        num_threads=1,
    )  # fmt: skip
    write_json(layout.litert_metrics("tf"), metrics)
    layout.litert_md("tf").write_text(markdown_table(metrics), encoding="utf-8")
    store = configure_store(tmp_path / "store")
    client = mlflow.MlflowClient(store.tracking_uri)
    run = client.create_run(get_or_create_experiment("litert-test", store))
    # finetune_tf: in litert.models, not exported (yet): skipped. keras: exported once, no
    # longer in litert.models: its stale report is not logged.
    write_json(layout.litert_metrics("keras"), {"files": {"keras-float32": {"size_mb": 1.0}}})
    logged_models = ["finetune_tf", "tf"] if log_models else ["finetune_tf"]  # track.log_models
    _log_litert(client, run.info.run_id, layout, ["tf", "finetune_tf"], logged=logged_models)
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "litert")}
    files = {"tf-float32.tflite", "tf-float32.labels.txt", "tf-float32.json"}
    assert {"tf.json", "tf.md"} <= logged and "keras.json" not in logged
    assert (files <= logged) == log_models and not (files & logged and not log_models)
    recorded = client.get_run(run.info.run_id).data.metrics
    assert recorded["litert.tf-float32.size_mb"] == pytest.approx(
        metrics["files"]["tf-float32"]["size_mb"]
    )
    assert "litert.keras-float32.size_mb" not in recorded
