"""The bottleneck cache: content-addressed, resumable after kill -9, corruption-proof.

A tiny backbone stands in for Inception V3 here: these tests are about caching, not about
the numbers (tests/test_backbone.py checks those on the real model).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from imgclf.executors import fill_cache
from imgclf.features import FeatureCache, ImageItem, cache_key, gather_features
from imgclf.fileio import sha256_file
from tests.helpers import make_image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

TINY_BACKBONE = """
import keras
import tensorflow as tf

def tiny_backbone(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(8),
    ])
    def preprocess(images):
        images = tf.image.resize(tf.cast(images, tf.float32), (32, 32))
        return (images - 128.0) / 128.0
    return model, preprocess
"""
namespace: dict = {}
exec(TINY_BACKBONE, namespace)
tiny_backbone = namespace["tiny_backbone"]


def make_items(folder: Path, n: int, start: int = 0) -> list[ImageItem]:
    items = []
    for i in range(start, start + n):
        path = make_image(folder / f"{i}.png", size=(40 + i % 7, 30), seed=i)
        items.append(ImageItem(f"train/x/{i}.png", path, sha256_file(path), 0))
    return items


def fill(items, cache, seed=0):
    return fill_cache(items, lambda: tiny_backbone(seed), cache, batch_size=4, progress=False)


def test_adding_images_computes_only_them_and_resplitting_computes_nothing(tmp_path):
    cache = FeatureCache(tmp_path / "cache", cache_key("ab" * 32, "tiny-v1", "float32"), dim=8)
    items = make_items(tmp_path / "img", 12)
    assert fill(items, cache)["computed"] == 12
    before = gather_features(items, cache)

    grown = items + make_items(tmp_path / "img", 10, start=100)
    stats = fill(grown, cache)
    assert (stats["computed"], stats["cached"]) == (10, 12)

    # Same images, other ids and subsets (a new split): nothing to compute, same vectors.
    resplit = [ImageItem(f"test/x/{i}", it.path, it.sha256, 1) for i, it in enumerate(items)]
    assert fill(resplit, cache)["computed"] == 0
    np.testing.assert_array_equal(gather_features(resplit, cache), before)


def test_a_changed_backbone_recomputes_everything(tmp_path):
    items = make_items(tmp_path / "img", 6)
    old = FeatureCache(tmp_path / "cache", cache_key("ab" * 32, "tiny-v1", "float32"), dim=8)
    new = FeatureCache(tmp_path / "cache", cache_key("cd" * 32, "tiny-v1", "float32"), dim=8)
    fill(items, old)
    assert fill(items, new, seed=1)["computed"] == 6
    assert not np.array_equal(gather_features(items, old), gather_features(items, new))


def test_features_match_a_direct_model_call_whatever_the_batching(tmp_path):
    items = make_items(tmp_path / "img", 7)
    cache = FeatureCache(tmp_path / "cache", "k", dim=8)
    fill(items, cache)
    model, preprocess = tiny_backbone()
    from imgclf.images import load_rgb

    direct = np.concatenate(
        [model(preprocess(load_rgb(it.path)[None]), training=False).numpy() for it in items]
    )
    np.testing.assert_allclose(gather_features(items, cache), direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_corrupt_entry_is_detected_and_recomputed(tmp_path, damage):
    items = make_items(tmp_path / "img", 3)
    cache = FeatureCache(tmp_path / "cache", "k", dim=8)
    fill(items, cache)
    good = gather_features(items, cache)
    entry = cache.path(items[1].sha256)
    blob = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(blob[:-5])
    elif damage == "flip":
        entry.write_bytes(bytes([blob[0] ^ 0xFF]) + blob[1:])
    else:
        entry.write_bytes(b"")
    assert cache.get(items[1].sha256) is None
    assert fill(items, cache)["computed"] == 1
    np.testing.assert_array_equal(gather_features(items, cache), good)


def test_an_unchecked_read_checks_the_length_only(tmp_path):
    """What write_subset reads after the fill has checked every entry in the same run."""
    items = make_items(tmp_path / "img", 2)
    cache = FeatureCache(tmp_path / "cache", "k", dim=8)
    fill(items, cache)
    flipped, short = (cache.path(it.sha256) for it in items)
    blob = flipped.read_bytes()
    flipped.write_bytes(bytes([blob[0] ^ 0xFF]) + blob[1:])
    short.write_bytes(short.read_bytes()[:-5])
    assert cache.get(items[0].sha256, check=False) is not None  # the checksum is not taken
    assert cache.get(items[1].sha256, check=False) is None and cache.bad == 1
    assert cache.get(items[0].sha256) is None and cache.bad == 2  # a checked read finds it


@pytest.mark.parametrize("how", ["copied", "renamed"])
def test_an_entry_moved_over_another_images_entry_is_detected_and_recomputed(tmp_path, how):
    items = make_items(tmp_path / "img", 3)
    cache = FeatureCache(tmp_path / "cache", "k", dim=8)
    fill(items, cache)
    good = gather_features(items, cache)
    a, b = cache.path(items[0].sha256), cache.path(items[2].sha256)
    if how == "copied":
        b.write_bytes(a.read_bytes())  # a valid entry, but image 0's features
    else:
        os.replace(a, b)
    stats = fill(items, FeatureCache(tmp_path / "cache", "k", dim=8))
    # Renamed: image 0's entry is missing too, which is not a bad entry.
    assert stats["computed"] == (1 if how == "copied" else 2)
    assert stats["recomputed_bad"] == 1
    np.testing.assert_array_equal(gather_features(items, cache), good)


def test_the_stage_says_how_many_bad_entries_it_recomputed(tmp_path):
    items = make_items(tmp_path / "img", 4)
    cache = FeatureCache(tmp_path / "cache", "k", dim=8)
    fill(items, cache)
    cache.path(items[3].sha256).write_bytes(cache.path(items[1].sha256).read_bytes())
    cache.path(items[2].sha256).write_bytes(b"garbage")
    stats = fill(items, FeatureCache(tmp_path / "cache", "k", dim=8))
    assert (stats["computed"], stats["recomputed_bad"], stats["cached"]) == (2, 2, 2)


def test_kill_9_mid_run_then_rerun_finishes_without_recomputing(tmp_path):
    items = make_items(tmp_path / "img", 40)
    cache_root = tmp_path / "cache"
    script = tmp_path / "run.py"
    script.write_text(
        TINY_BACKBONE
        + textwrap.dedent(
            f"""
            import time
            from pathlib import Path
            from imgclf.executors import fill_cache
            from imgclf.features import FeatureCache, ImageItem
            from imgclf.fileio import sha256_file
            paths = sorted(Path({str(tmp_path / "img")!r}).glob("*.png"))
            items = [ImageItem(p.name, p, sha256_file(p), 0) for p in paths]
            import tensorflow as tf
            model, preprocess = tiny_backbone()

            def slow_preprocess(images):  # slow enough for the kill to land mid-run
                images = tf.numpy_function(lambda x: (time.sleep(0.05), x)[1], [images], tf.uint8)
                return preprocess(tf.ensure_shape(images, [None, None, None, 3]))

            cache = FeatureCache(Path({str(cache_root)!r}), "k", 8)
            fill_cache(items, lambda: (model, slow_preprocess), cache, batch_size=1, progress=False)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    cache = FeatureCache(cache_root, "k", dim=8)
    deadline = time.monotonic() + 300  # TF's import alone can take a minute on a loaded machine
    while time.monotonic() < deadline and len(list(cache.dir.rglob("*.f32"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    written = [p for p in cache.dir.rglob("*.f32")]
    assert 5 <= len(written) < 40, "the kill should land mid-run"
    shas = [it.sha256 for it in items]
    assert all(cache.get(sha) is not None for sha in shas if cache.path(sha) in written)
    stats = fill(items, cache)
    assert stats["computed"] == 40 - len(written)
    assert len(gather_features(items, cache)) == 40
