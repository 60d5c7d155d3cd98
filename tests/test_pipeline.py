"""The whole pipeline, as users run it: `dvc repro`, `dvc exp run -S`, `dvc status`, diffs.

Runs in a scratch git repo holding a copy of the project and a small sample of the real
flower photos (skipped without ../shared). Everything is real: DVC, TensorFlow, the
converted Inception V3, MLflow with a SQLite store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
PER_CLASS = 14

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> str:
    # Stage commands say `python`: the one of this venv, as with an activated venv.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def copy_project(dest: Path) -> None:
    """The files git would give a fresh clone (tracked and new, not ignored), no outputs."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], ROOT).split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith(("data/", "models/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def sample_flowers(shared: Path, dest: Path) -> Path:
    """A few photos per class, plus the real cross-class duplicate and LICENSE.txt."""
    flowers = shared / "flower_photos"
    for class_dir in sorted(p for p in flowers.iterdir() if p.is_dir()):
        for photo in sorted(class_dir.glob("*.jpg"))[:PER_CLASS]:
            (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, dest / class_dir.name / photo.name)
    for name in ("roses", "tulips"):
        shutil.copy2(flowers / name / "15922772266_1167a06620.jpg", dest / name)
    shutil.copy2(flowers / "LICENSE.txt", dest / "LICENSE.txt")
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    shared = ROOT.parent / "shared" / "datasets"
    if not shared.is_dir():
        pytest.skip(f"real data sets not found at {shared} (../shared is absent)")
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo)
    photos = sample_flowers(shared, tmp_path_factory.mktemp("flowers"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = str(photos)
    params["ingest"]["min_images_per_class"] = 5
    params["evaluate"]["min_accuracy"] = 0.0  # 14 images per class: a test of plumbing
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ.setdefault("IMGCLF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], repo)
    run([*DVC, "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], repo)
    return repo


def read(repo: Path, name: str):
    return json.loads((repo / name).read_text())


def test_repro_builds_every_stage_and_the_split_trees(project):
    split = read(project, "metrics/split.json")
    assert split["classes"] == 5
    for counts in split["per_class"].values():
        assert abs(counts["test"] - 0.2 * (counts["test"] + counts["train"])) <= 1
    ingest = read(project, "metrics/ingest.json")
    # The photo filed under roses and tulips is dropped from both; LICENSE.txt is skipped.
    assert ingest["images"] == 5 * PER_CLASS
    names = {p.name for p in (project / "data" / "split").rglob("*.jpg")}
    assert "15922772266_1167a06620.jpg" not in names
    for head in ("tf", "keras", "sklearn"):
        result = read(project, f"metrics/evaluate/{head}.json")
        assert 0.0 <= result["accuracy"] <= 1.0
    assert "| TF |" in (project / "metrics" / "comparison.md").read_text()


def test_nothing_to_do_after_a_repro(project):
    # `source` only fingerprints data.source, so DVC lists it as "always changed".
    out = run([*DVC, "status", "--json"], project)
    assert set(json.loads(out)) <= {"source"}, out


def test_forced_rerun_gives_identical_metrics(project):
    before = {h: read(project, f"metrics/evaluate/{h}.json") for h in ("tf", "keras", "sklearn")}
    run([*DVC, "repro", "--force", "train_tf", "train_keras", "train_sklearn", "evaluate"], project)
    after = {h: read(project, f"metrics/evaluate/{h}.json") for h in ("tf", "keras", "sklearn")}
    assert after == before


def test_exp_run_with_a_new_learning_rate_reruns_only_that_head(project):
    out = run([*DVC, "exp", "run", "-S", "train_keras.learning_rate=0.0003"], project)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert "train_keras" in ran and "evaluate" in ran
    assert not ran & {"source", "ingest", "split", "backbone", "bottlenecks", "train_tf"} - {
        "source"
    }
    diff = run([*DVC, "params", "diff"], project)
    assert "train_keras.learning_rate" in diff and "0.0003" in diff
    metrics = run([*DVC, "metrics", "diff", "--all"], project)
    assert "metrics/evaluate/keras.json" in metrics
