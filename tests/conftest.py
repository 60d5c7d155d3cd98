"""Fixtures shared by the test suite: the real data in ../shared, generated images."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# TensorFlow is chatty on import; the tests only need its errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def pytest_configure(config: pytest.Config) -> None:
    """Stop before the first test of the whole suite (`make test`: no paths given) when its
    temporary files cannot fit; a run of a few files is not held to the suite's peak. The
    controller checks; xdist's workers share its folder."""
    from tests.helpers import SUITE_TEMP_BYTES, lack_of_space

    if hasattr(config, "workerinput") or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    root = config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT")
    if problem := lack_of_space(Path(root or tempfile.gettempdir()), SUITE_TEMP_BYTES):
        raise pytest.UsageError(problem)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own user cache, so tests never see each other's downloads."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def world_tmp():
    """A folder every user can reach, for a test whose unprivileged child
    (`helpers.as_unprivileged`) reads or writes there: pytest's own are private to their owner."""
    path = Path(tempfile.mkdtemp(prefix="imgclf-world-"))
    path.chmod(0o777)
    yield path
    subprocess.run(["chmod", "-R", "u+rwX", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data sets not found at {SHARED} (../shared is absent)")
    return SHARED


# The files that take minutes, longest first (by their time in `make test`). Under
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` (make test) each file goes whole to the
# next free worker, in collection order: started last, the whole-pipeline file would run alone
# at the end while the other worker idles.
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_finetune_search.py",
    "test_finetune.py",
    "test_tracking.py",
    "test_litert.py",
    "test_runtimes.py",
    "test_activations.py",
    # Late on purpose, though 2 to 3 min with the Ray extra: beside the fine-tune files its
    # actors' restarts cost twice as much (fourth in this list, the suite took 16 min 45 s
    # twice; here, 14 min 46 s, the same hour).
    "test_ray_executor.py",
    "test_backbone.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
