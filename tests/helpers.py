"""Generators for test fixtures: small real image files and class-folder trees; a child
process that file permissions apply to; the suite's check of free disk space."""

from __future__ import annotations

import codecs
import os
import pickle
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
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


T = TypeVar("T")
NOBODY = 65534


def as_unprivileged(fn: Callable[[], T]) -> T:
    """fn() in a forked child that file permissions apply to: as root (CI, containers), the
    child drops to nobody first, since root reads any file whatever its mode. The result comes
    back pickled; an exception in the child fails the caller with its traceback. The files fn
    touches must be reachable by nobody (see `world_tmp`)."""
    # The child cannot import what nobody may not read (this interpreter may live under
    # /root): what the code under test loads lazily is loaded here first.
    codecs.lookup("utf-8-sig")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            answer = ("ok", fn())
        except BaseException:
            answer = ("error", traceback.format_exc())
        with os.fdopen(write, "wb") as f:
            pickle.dump(answer, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        pytest.fail("the unprivileged child died without an answer")
    status, value = pickle.loads(data)
    if status == "error":
        pytest.fail(f"in the unprivileged child:\n{value}")
    return value


# What one `make test` writes under pytest's temporary folder at its peak, with a margin: 2.25
# GB (sampled every 15 s through a CI run, 8 Dec 2026) now that pyproject.toml's
# tmp_path_retention_policy removes a passing test's folder as it ends; 3.4 GB before.
SUITE_TEMP_BYTES = 3 * 10**9


def lack_of_space(folder: Path, needed_bytes: int) -> str | None:
    """Why the suite cannot run with its temporary files under `folder` (which may not exist
    yet: its nearest existing parent is measured), or None when the disk has `needed_bytes`
    free. A full disk otherwise shows as hundreds of errors and an OSError from pytest itself."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free >= needed_bytes:
        return None
    return (
        f"the test suite writes up to {needed_bytes / 1e9:.1f} GB of temporary files under "
        f"{folder}, and its disk has {free / 1e9:.1f} GB free: free some space there, or point "
        "the suite at a larger disk: TMPDIR=/big/disk/tmp make test"
    )
