"""The track stage: MLflow runs, curves, artifacts, registered end-to-end models, serving, DVC.

The pipeline result the tests track is small but real: real image files in the split layout, the
real Inception V3 architecture and preprocessing (`imgclf.inception`, saved and loaded in the
backbone stage's format) with RANDOM weights (no download, seeded), bottlenecks computed the way
the bottlenecks stage does (load_rgb -> Backbone.preprocess -> model), the real train_tf,
train_keras, train_sklearn and evaluate stages on tiny hyperparameters. What this proves: the
tracking, the registry, the end-to-end graph and serving reproduce the pipeline's own numbers.
It does not prove anything about accuracy on flowers (random weights; coloured noise images).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.fileio import sha256_file, write_csv, write_json
from tests.helpers import make_image

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
N_TRAIN, N_TEST = 8, 4


# --------------------------------------------------------------------------- a tiny result


def _coloured_image(path: Path, rgb: tuple[int, int, int], seed: int) -> Path:
    """A noisy image around `rgb`, of a size that varies with the seed (the end-to-end models
    take any size)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = 40 + 8 * (seed % 5), 36 + 6 * (seed % 4)
    noise = rng.normal(0, 35, size=(h, w, 3))
    pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, quality=95)
    return path


def tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "tests/generated"
    params["train_tf"].update(steps=60, eval_every=20, batch_size=8, learning_rate=0.5)
    params["train_keras"].update(epochs=4, batch_size=8, hidden_units=16, learning_rate=0.01)
    params["heads"]["validation_fraction"] = 0.25
    params["evaluate"]["min_accuracy"] = 0.0
    params["evaluate"]["misclassified_sheet_max"] = 8
    return params


def build_tiny_result(workdir: Path) -> dict:
    """Write a complete pipeline result (data, backbone, bottlenecks, three heads, every metric
    and report) under `workdir`, with the stages' own code; returns the params used."""
    import tensorflow as tf

    from imgclf import inception
    from imgclf.images import load_rgb

    workdir.mkdir(parents=True, exist_ok=True)
    params = tiny_params()
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    paths = params["paths"]
    split = workdir / paths["split"]
    rows, seed = [], 0
    for name, rgb in CLASSES.items():
        for subset, n in (("train", N_TRAIN), ("test", N_TEST)):
            for i in range(n):
                seed += 1
                rel = f"{subset}/{name}/{name}_{i:02d}.jpg"
                path = _coloured_image(split / rel, rgb, seed)
                w, h = load_rgb(path).shape[1::-1]
                rows.append({"class": name, "label": name, "file": rel,
                             "sha256": sha256_file(path), "width": w, "height": h,
                             "format": "JPEG", "origin": f"generated:{seed}", "subset": subset})  # fmt: skip
    fields = ["class", "label", "file", "sha256", "width", "height", "format", "origin", "subset"]
    write_csv(split / "manifest.csv", fields, rows)
    write_csv(workdir / paths["manifest"], fields[:-1],
              [{k: r[k] for k in fields[:-1]} for r in rows])  # fmt: skip

    # The real architecture, seeded random weights, the backbone stage's file format.
    keras_seed = 0
    tf.keras.utils.set_random_seed(keras_seed)
    model = inception.build_inception_v3("max")
    # Fresh batch norms (mean 0, variance 1) shrink random activations to ~1e-4 by the last
    # block, too small for the heads to learn from in a few steps. One training-mode pass with
    # momentum 0 sets every moving mean/variance to the statistics of a calibration batch, so
    # the features are O(1): a random but sane feature extractor.
    calibration = tf.concat(
        [inception.preprocess_tf2015(load_rgb(split / r["file"])) for r in rows[::4]], axis=0
    )
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(calibration, training=True)
    inception.save_backbone(model, workdir / paths["backbone"], "tf-2015", {"test": "random"})
    backbone = inception.load_backbone(workdir / paths["backbone"])

    classes = sorted(CLASSES)
    bottlenecks = workdir / paths["bottlenecks"]
    for subset in ("train", "test"):
        subset_rows = sorted((r for r in rows if r["subset"] == subset), key=lambda r: r["file"])
        feats = np.concatenate([
            backbone.model(backbone.preprocess(load_rgb(split / r["file"])), training=False).numpy()
            for r in subset_rows
        ])  # fmt: skip
        bottlenecks.mkdir(parents=True, exist_ok=True)
        np.savez(
            bottlenecks / f"{subset}.npz",
            features=feats.astype(np.float32),
            labels=np.array([classes.index(r["class"]) for r in subset_rows], np.int64),
            ids=np.array([r["file"] for r in subset_rows]),
        )
    write_json(bottlenecks / "classes.json", classes)

    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        from stages import evaluate, train_keras, train_sklearn, train_tf

        for stage in (train_tf, train_keras, train_sklearn):
            stage.main()
        code = evaluate.run(
            bottleneck_dir=paths["bottlenecks"],
            models_dir=paths["models"],
            metrics_dir=paths["metrics"],
            split_dir=paths["split"],
            min_accuracy=0.0,
            sheet_max=8,
            heads_source_dir=ROOT / "imgclf" / "heads",
        )
        assert code == 0
    finally:
        os.chdir(cwd)
    return params
