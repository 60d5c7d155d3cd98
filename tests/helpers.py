"""Generators for test fixtures: small real image files and class-folder trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image(
    path: Path, size=(64, 48), seed: int = 0, mode: str = "RGB", fmt: str | None = None
) -> Path:
    """Write a small random image; distinct seeds give distinct bytes."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_class_tree(root: Path, classes: dict[str, int], size=(64, 48), seed: int = 0) -> Path:
    """A `<class>/img_NNNN.jpg` tree with `classes[name]` distinct images per class."""
    k = seed * 100_000
    for name, count in classes.items():
        for i in range(count):
            k += 1
            make_image(root / name / f"img_{i:04d}.jpg", size=size, seed=k)
    return root
