"""The whole pipeline, as users run it: `dvc repro`, `make exp`, `make seeds`, `dvc status`,
diffs.

Runs in a scratch git repo holding a copy of the project and a small sample of the real
flower photos (skipped without ../shared). Everything is real: DVC, TensorFlow, the
converted Inception V3, MLflow with a SQLite store, make. The README's commands run as in a
fresh shell: no venv on PATH, no git identity.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from imgclf.runtimes import cpu_flags, resolved_precision
from tests.test_dvc_deps import load_dvc_stages

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
PER_CLASS = 14

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, *, with_stderr: bool = False) -> str:
    # Stage commands say `python`: the one of this venv, as with an activated venv.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + (done.stderr if with_stderr else "")


# New files not yet added to git are copied from these folders only: elsewhere, an untracked
# file is a pipeline output (metrics/...), a labelled photo or some other trace of use.
SOURCE_DIRS = ("imgclf/", "stages/", "tools/", "tests/", "bench/", ".dvc/plots/")
# The files the README's commands rewrite in the workspace (and `dvc exp run` stages too):
# the copy takes them as committed, so a user's `dvc exp run -S ...` cannot change the tests.
AS_COMMITTED = ("params.yaml", "dvc.lock")


def git_lines(root: Path, command: str, *args: str) -> list[str]:
    return [n for n in run(["git", command, "-z", *args], root).split("\0") if n]


def copy_project(dest: Path, src: Path = ROOT) -> None:
    """A fresh clone with the working copy's code: the tracked files as they are in the
    working tree (a change being tested), new files under SOURCE_DIRS, AS_COMMITTED from HEAD."""
    tracked = git_lines(src, "ls-files", "--cached")
    new = git_lines(src, "ls-files", "--others", "--exclude-standard", "--", *SOURCE_DIRS)
    for name in [*tracked, *new]:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in AS_COMMITTED:
            committed = subprocess.run(
                ["git", "show", f"HEAD:{name}"], cwd=src, capture_output=True, check=True
            ).stdout
            target.write_bytes(committed)
        elif (src / name).is_file():  # a tracked file deleted in the working tree is gone
            shutil.copy2(src / name, target)


def fresh_shell(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a new terminal on a machine where nothing is set up: no venv on
    PATH, no git identity (`git config user.name` unset), only the test's caches kept."""
    env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "LANG": "C.UTF-8",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for name in ("IMGCLF_CACHE_DIR", "MLFLOW_TRACKING_URI"):
        if name in os.environ:
            env[name] = os.environ[name]
    return {**env, **extra}


def run_in(cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if ok:
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def make(project: Path, *args: str, env: dict[str, str]) -> str:
    # -o: the scratch copy's .venv is the test's own venv (a symlink) and the plots page is
    # not needed: neither may be rebuilt (that would reinstall the venv from the copy).
    cmd = ["make", "-o", ".venv/bin/activate", "-o", ".dvc/plots/offline.html", *args]
    return run_in(cmd, project, env).stdout


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


# A sixth model, added as a user would add one: its module, its registry entry and its params
# block (with its name in `models:`), nothing else. Nearest class mean on the bottlenecks,
# servable end to end (its graph head is two TensorFlow ops).
NCM_MODULE = '''"""Nearest class mean on the bottlenecks (a model added by the tests)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from imgclf.heads.common import TrainResult, accuracy_and_loss, save_model_dir, stopwatch
from imgclf.params import Block, number

FILES = ("means.npy", "temperature.npy")


@dataclass(frozen=True)
class TrainNcmParams(Block):
    section: ClassVar[str] = "train_ncm"
    temperature: float = number(0, math.inf, open_low=True)


def _proba(model: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    d = ((np.asarray(x, np.float32)[:, None, :] - model["means"][None]) ** 2).sum(-1)
    logits = -d / model["temperature"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def train_ncm(x_train, y_train, x_val, y_val, *, n_classes, seed, temperature) -> TrainResult:
    with stopwatch() as timer:
        means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(n_classes)])
    model = {"means": means.astype(np.float32), "temperature": np.float32(temperature)}
    val_accuracy, val_loss = accuracy_and_loss(_proba(model, x_val), y_val)
    summary = {"final_val_accuracy": val_accuracy, "best_val_accuracy": val_accuracy,
               "final_val_loss": val_loss, "best_val_loss": val_loss}
    return TrainResult(model=model, summary=summary, train_seconds=timer["seconds"])


def save_ncm(model: dict, model_dir: str | Path, classes: list[str]) -> None:
    def write(tmp: Path) -> None:
        np.save(tmp / FILES[0], model["means"])
        np.save(tmp / FILES[1], np.asarray(model["temperature"], np.float32))

    save_model_dir(model_dir, classes, write)


def load_ncm(model_dir: str | Path) -> dict[str, np.ndarray]:
    means, temperature = (np.load(Path(model_dir) / f) for f in FILES)
    return {"means": means, "temperature": np.float32(temperature)}


def count_parameters(model: dict) -> int:
    return int(model["means"].size)


def predictor(model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    model = load_ncm(model_dir)
    return lambda x: _proba(model, x)


def graph_head(model_dir: str | Path) -> tuple[Any, Callable]:
    import tensorflow as tf

    model = load_ncm(model_dir)
    head = tf.Module()
    head.means = tf.Variable(model["means"], trainable=False)
    scale = float(model["temperature"])

    def probabilities(x):
        d = tf.reduce_sum(tf.square(x[:, None, :] - head.means[None]), axis=-1)
        return tf.nn.softmax(-d / scale)

    return head, probabilities


def weights_digest(model_dir: str | Path) -> bytes:
    return hashlib.sha256(b"".join((Path(model_dir) / f).read_bytes() for f in FILES)).digest()
'''
NCM_ENTRY = """        ModelSpec(
            name="ncm",
            display_name="Nearest mean",
            module="imgclf.heads.ncm_head",
            params="imgclf.heads.ncm_head:TrainNcmParams",
            train="train_ncm",
            save="save_ncm",
            load="load_ncm",
            description="nearest class mean on the bottlenecks",
            servable=True,
            summary=None,
        ),
"""
NCM_FILES = ("imgclf/heads/ncm_head.py", "imgclf/registry.py", "params.yaml")


def add_ncm_model(repo: Path, params: dict) -> None:
    """The three edits that add a model (NCM_FILES); `params` is then written by the caller."""
    (repo / NCM_FILES[0]).write_text(NCM_MODULE)
    registry = repo / NCM_FILES[1]
    marker = "        # New models above this line."
    text = registry.read_text()
    assert marker in text
    registry.write_text(text.replace(marker, NCM_ENTRY + marker))
    params["models"].append("ncm")
    params["train_ncm"] = {"temperature": 100.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    shared = ROOT.parent / "shared" / "datasets"
    if not shared.is_dir():
        pytest.skip(f"real data sets not found at {shared} (../shared is absent)")
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo)
    # The venv the tests run in, where the Makefile expects one (kept out of git).
    (repo / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    run(["git", "init", "-q"], repo)
    (repo / ".git" / "info" / "exclude").write_text(".venv\n")
    commit(repo, "copy")  # what the sixth model's edits are compared with
    photos = sample_flowers(shared, tmp_path_factory.mktemp("flowers"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = str(photos)
    params["ingest"]["min_images_per_class"] = 5
    params["evaluate"]["min_accuracy"] = 0.0  # 14 images per class: a test of plumbing
    # Short trainings: these tests are about the plumbing, not the recipes (4,000 TF steps and
    # up to 60 Keras epochs would cost a minute per pipeline pass, and the tests run five).
    params["train_tf"].update(steps=400, eval_every=50)
    params["train_keras"]["epochs"] = 15
    for name in params["finetune_models"]:
        params[name]["epochs"] = 1
    # One fine-tune from its trained head, the other from its head refitted on its own inputs.
    params["finetune_keras"]["refit_head"] = True
    # Two views, not the ten of params.yaml: each view is a backbone pass per training image and
    # an epoch's share of both fine-tunes, in every pass of the pipeline (tests/test_activations.py
    # adds a view to a cached stage).
    params["activations"]["train_views"] = ["orig", "flip"]
    # One model's float32 file: the export's plumbing, at ~35 s a pipeline pass (the int8
    # calibration would add ~40 s; tests/test_litert.py covers the three precisions on a small
    # model).
    params["litert"]["models"] = ["tf"]
    params["litert"]["precisions"] = ["float32"]
    add_ncm_model(repo, params)
    # Two end-to-end models of five, at ~15 s an export: the sixth model (servable by adding
    # it) and one fine-tune; tests/test_tracking.py registers and serves the others.
    params["track"]["log_models"] = ["ncm", "finetune_keras"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ.setdefault("IMGCLF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    commit(repo, "base")
    repro_log(repo).write_text(run([*DVC, "repro"], repo, with_stderr=True))
    commit(repo, "repro")
    return repo


def repro_log(repo: Path) -> Path:
    """What the project's first `dvc repro` printed, kept beside it (outside its git tree)."""
    return repo.parent / f"{repo.name}.repro.log"


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


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
    for head in ("tf", "keras", "sklearn", "finetune_tf", "finetune_keras"):
        result = read(project, f"metrics/evaluate/{head}.json")
        assert 0.0 <= result["accuracy"] <= 1.0
    assert "| TF |" in (project / "metrics" / "comparison.md").read_text()
    litert = read(project, "metrics/litert/tf.json")  # export@tf, the one litert.models
    assert set(litert["files"]) == {"tf-float32"}
    assert litert["test_images"] == read(project, "metrics/evaluate/tf.json")["n_test"]
    assert litert["files"]["tf-float32"]["max_abs_prob_diff"] < 1e-3
    assert (project / "models" / "litert" / "tf" / "tf-float32.tflite").is_file()
    assert "| `tf-float32.tflite` |" in (project / "metrics" / "litert" / "tf.md").read_text()
    # The label audit ran on the training images outside the validation slice; by default
    # the models trained on every one of them.
    audit = read(project, "metrics/audit.json")
    train = read(project, "metrics/train/tf.json")
    assert audit["images_audited"] == train["n_train"] and train["n_label_issues_dropped"] == 0
    assert (project / "metrics" / "label_issues.png").is_file()


def test_track_prints_its_summary_without_mlflows_chatter(project):
    # MLflow's INFO lines and its artifact progress bars (two a logged model) once buried it.
    log = repro_log(project).read_text()
    assert "track: run " in log and "finetune_keras v1" in log
    assert "Downloading artifacts" not in log and "INFO mlflow" not in log


def test_repro_prints_no_tensorflow_error_lines(project):
    # Keras' model.predict logged a C++ "E0000 ... NodeDef mentions attribute" line in the
    # finetune_keras stage's output: an error line a user must not have to judge harmless.
    log = repro_log(project).read_text()
    # The C++ log prefix (severity, month and day, time, thread), anywhere: after a \r too.
    assert not re.findall(r"\b[EF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ .*", log)


def test_the_fine_tuned_models_are_evaluated_and_registered(project):
    md = (project / "metrics" / "comparison.md").read_text()
    assert "| TF fine-tuned |" in md and "| Keras fine-tuned |" in md
    pairs = read(project, "metrics/evaluate/comparison.json")
    assert {"finetune_tf_vs_finetune_keras", "tf_vs_finetune_tf", "keras_vs_finetune_keras"} <= (
        set(pairs)
    )
    n_test = read(project, "metrics/evaluate/tf.json")["n_test"]
    assert read(project, "metrics/evaluate/finetune_keras.json")["n_test"] == n_test
    for name in ("finetune_tf", "finetune_keras"):
        assert (project / "models" / "heads" / name / "finetune.json").is_file()
        assert not (project / "models" / name).exists()  # the layout's folder, not the old one
        # flip is a train view, so the stage scores validation with test-time flips too.
        trained = read(project, f"metrics/train/{name}.json")
        assert 0.0 <= trained["val_accuracy_with_flips"] <= 1
        assert trained["refit_head"] == int(name == "finetune_keras")
        assert (trained["refit_head_seconds"] > 0) == (name == "finetune_keras")
        assert 2**26 < trained["peak_rss_bytes"] < 6 * 2**30  # TensorFlow alone is > 64 MiB
        # params.yaml's precision: auto, as this CPU resolves it (bfloat16 models, where it
        # does, are then what track registers and serves below).
        info = read(project, f"metrics/train/{name}.info.json")
        assert info["precision"] == resolved_precision("auto", cpu_flags())
    # track.log_models lists finetune_keras (and ncm): only those are registered.
    tracked = read(project, "metrics/mlflow_run.json")
    assert tracked["heads"]["finetune_keras"]["registered_model"].endswith("-finetune_keras")
    assert tracked["heads"]["finetune_keras"]["registered_version"] == "1"
    for name in ("tf", "keras", "finetune_tf"):
        assert "registered_model" not in tracked["heads"][name]
        assert tracked["heads"][name]["run_id"]


def test_a_sixth_model_needs_only_its_module_entry_and_params(project, tmp_path):
    # The model was added by editing NCM_FILES only (params.yaml also got the sample's source).
    copied, base = (run(["git", "rev-list", f"--grep=^{m}$", "HEAD"], project).strip()
                    for m in ("copy", "base"))  # fmt: skip
    assert set(git_lines(project, "diff", "--name-only", copied, base)) == set(NCM_FILES)
    assert not (ROOT / NCM_FILES[0]).exists()
    listed = run([*DVC, "stage", "list", "--name-only"], project).split()
    assert {"train@tf", "train@keras", "train@sklearn", "train@ncm"} <= set(listed), listed
    # evaluate's report
    assert read(project, "metrics/evaluate/ncm.json")["n_test"] > 0
    assert "| Nearest mean |" in (project / "metrics" / "comparison.md").read_text()
    # MLflow: a child run with its metrics, and an end-to-end model in the registry
    tracked = read(project, "metrics/mlflow_run.json")
    assert set(tracked["heads"]) == {"tf", "keras", "sklearn", "ncm", "finetune_tf",
                                     "finetune_keras"}  # fmt: skip
    assert tracked["heads"]["ncm"]["registered_model"].endswith("-ncm")
    # label-image --head: built from the pipeline's backbone and the new model
    photo = next((project / "data" / "split" / "test").rglob("*.jpg"))
    done = run(
        [sys.executable, "-m", "imgclf.label_image", str(photo), "--head", "ncm", "--json",
         "--out-dir", str(tmp_path)],
        project,
    )  # fmt: skip
    (result,) = json.loads(done)["results"]
    assert result["top"][0]["label"] in read(project, "metrics/split.json")["per_class"]


def test_nothing_to_do_after_a_repro(project):
    # `source` only fingerprints data.source, so DVC lists it as "always changed".
    out = run([*DVC, "status", "--json"], project)
    assert set(json.loads(out)) <= {"source"}, out


def test_forced_rerun_gives_identical_metrics(project):
    before = {h: read(project, f"metrics/evaluate/{h}.json") for h in ("tf", "keras", "sklearn")}
    # --single-item: without it --force reruns every upstream stage too (ingest, backbone...).
    stages = ["train@tf", "train@keras", "train@sklearn", "evaluate"]
    run([*DVC, "repro", "--force", "--single-item", *stages], project)
    after = {h: read(project, f"metrics/evaluate/{h}.json") for h in ("tf", "keras", "sklearn")}
    assert after == before


def test_make_exp_in_a_fresh_shell_and_a_temp_copy_reruns_only_what_it_changes(project, tmp_path):
    # As a user pastes the README's line into a new terminal: make finds the venv's python
    # for the stages and supplies a git identity for DVC's experiment commit. The scikit-learn
    # head, the one no fine-tune starts from: a Keras param would rerun finetune_keras too
    # (~40 s here), and tests/test_dvc_deps.py checks which stages each param reaches.
    c = yaml.safe_load((project / "params.yaml").read_text())["train_sklearn"]["C"]
    new_c = c * 3
    env = fresh_shell(tmp_path)
    assert run_in(["git", "config", "user.name"], project, env, ok=False).stdout == ""
    before = run(["git", "status", "--porcelain"], project)
    # --temp, as --queue: a copy holding what git and DVC's cache hold (the project's result
    # is committed). The fine-tunes' TensorBoard events were cache: false outs outside git:
    # absent there, they made both fine-tunes run again in every such experiment.
    # data/activations still is one: its stage rebuilds it from the activation cache.
    # track.log_models=false: the rerun's MLflow runs without re-exporting two end-to-end
    # models (~45 s), which the project's build and tests/test_tracking.py cover.
    out = make(
        project, "exp", f"SET=train_sklearn.C={new_c} track.log_models=false",
        "EXP_ARGS=--temp -n c-x3", env=env,
    )  # fmt: skip
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # source is always_changed: it only hashes the data, which ingest finds unchanged.
    assert ran == {"source", "activations", "train@sklearn", "evaluate", "track"}, ran
    # A --temp run leaves the workspace's results as they were: make points at none.
    assert "results: metrics/comparison.md" not in out
    assert run(["git", "status", "--porcelain"], project) == before  # the workspace untouched
    # The README's comparison of two results: changed params and numbers, nothing else.
    done = run_in([*DVC, "exp", "diff", "HEAD", "c-x3"], project, os.environ.copy())
    assert "failed to load" not in done.stdout + done.stderr
    assert "train_sklearn.C" in done.stdout and "sha256" not in done.stdout
    run([*DVC, "exp", "apply", "c-x3"], project)  # the experiment's result, in the workspace
    diff = run([*DVC, "params", "diff"], project)
    assert "train_sklearn.C" in diff and str(new_c) in diff
    metrics = run([*DVC, "metrics", "diff", "--all"], project)
    assert "metrics/evaluate/sklearn.json" in metrics


def test_metrics_files_hold_only_numbers_and_diff_cleanly(project):
    # Every `metrics:` file of dvc.yaml, as DVC reads it for show/diff/exp show.
    shown = json.loads(run([*DVC, "metrics", "show", "--json"], project))
    (workspace,) = shown.values()  # keyed "" or "workspace", depending on the DVC version
    files = workspace["data"]
    stages = load_dvc_stages(project)  # with train@<model> expanded
    metric_files = {
        name for stage in stages.values() for entry in stage.get("metrics", []) for name in entry
    }
    assert metric_files <= set(files), f"not loaded by DVC: {metric_files - set(files)}"
    assert len(metric_files) >= 10

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for name in sorted(metric_files):
        bad = {k: v for k, v in leaves(files[name]["data"]) if type(v) not in (int, float)}
        assert not bad, f"{name} holds values that are not numbers: {bad}"
    # The strings moved beside them, where the stages' readers find them.
    assert read(project, "metrics/backbone.info.json")["weights"] == "tf-2015"
    assert read(project, "metrics/ingest.info.json")["kind"] == "tree"
    assert read(project, "metrics/train/tf.info.json")["optimizer"] == "sgd"


def test_split_seeds_runs_from_a_fresh_shell_and_restores_params(project, tmp_path):
    before = (project / "params.yaml").read_bytes()
    # The script itself, without make: it must give the stages its own interpreter.
    identity = {f"GIT_{who}_{what}": v for who in ("AUTHOR", "COMMITTER")
                for what, v in (("NAME", "t"), ("EMAIL", "t@t"))}  # fmt: skip
    env = fresh_shell(tmp_path, **identity)
    # Seed 0, the workspace's own: the tool's whole path (an experiment per seed, the tables,
    # params restored, the closing repro) without retraining every model twice (~4 min on an
    # AVX2 CPU). That a new seed reruns the split and all after it is dvc.yaml's deps
    # (tests/test_dvc_deps.py); the failing run below runs the seeded split stage for real.
    done = run_in([sys.executable, "tools/split_seeds.py", "--seeds", "0"], project, env)
    assert "| TF |" in done.stdout
    assert "| TF vs Keras |" in done.stdout  # McNemar of each pair, per seed
    # The validation table comes first: the numbers a recipe is chosen by.
    assert done.stdout.index("| Validation accuracy") < done.stdout.index("| Head | Test")
    # The fine-tunes' cost on each seed, from their stages' own metrics.
    assert re.search(r"\| TF fine-tuned \| \d+ \| \d+\.\d\d \|", done.stdout)
    assert (project / "params.yaml").read_bytes() == before
    assert set(json.loads(run([*DVC, "status", "--json"], project))) <= {"source"}
    # A pass for its tables alone skips the closing repro (and still restores params.yaml).
    tables_only = run_in(
        [sys.executable, "tools/split_seeds.py", "--seeds", "0", "--no-closing-repro"],
        project, env,
    )  # fmt: skip
    assert "| TF |" in tables_only.stdout
    assert "$ dvc exp run" in tables_only.stdout and "$ dvc repro" not in tables_only.stdout
    assert (project / "params.yaml").read_bytes() == before

    # A run that fails half-way (a class too small to split) leaves params.yaml as it was too.
    failed = run_in(
        ["make", "-o", ".venv/bin/activate", "-o", ".dvc/plots/offline.html", "seeds",
         "SEEDS=2", "SET=split.min_per_class=1000"],
        project, fresh_shell(tmp_path), ok=False,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "split.min_per_class is 1000" in failed.stdout + failed.stderr
    assert (project / "params.yaml").read_bytes() == before


def test_a_stage_run_by_another_python_says_what_to_do():
    # Run from the repository, as DVC runs a stage; the repository's tf_or_keras.egg-info (from
    # `pip install -e .`) must not pass for an installed project.
    other = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    probe = "import importlib.metadata as m; m.distribution('tf-or-keras')"
    elsewhere = Path(tempfile.gettempdir())  # not the repository: only what is installed counts
    if (
        other is None
        or subprocess.run([other, "-c", probe], cwd=elsewhere, capture_output=True).returncode == 0
    ):
        pytest.skip("no python3 on the system PATH without the project installed")
    done = subprocess.run([other, "-m", "stages.source"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "is not installed for it" in done.stderr and "source .venv/bin/activate" in done.stderr
    assert "Traceback" not in done.stderr


def test_copy_project_takes_the_committed_params_and_leaves_outputs(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "imgclf").mkdir(parents=True)
    dest.mkdir()
    (src / "params.yaml").write_text("lr: 1\n")
    (src / "imgclf" / "a.py").write_text("A = 1\n")
    run(["git", "init", "-q"], src)
    run(["git", "add", "-A"], src)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], src)
    # What the README's commands leave behind: `dvc exp run -S` rewrites and stages params.yaml,
    # the pipeline writes untracked metrics, label-image writes pictures.
    (src / "params.yaml").write_text("lr: 3\n")
    run(["git", "add", "params.yaml"], src)
    (src / "metrics").mkdir()
    (src / "metrics" / "ingest.json").write_text("{}\n")
    (src / "labelled").mkdir()
    (src / "labelled" / "photo.labelled.png").write_bytes(b"png")
    # What a developer is testing: a changed module and a new one not yet added.
    (src / "imgclf" / "a.py").write_text("A = 2\n")
    (src / "imgclf" / "new.py").write_text("B = 1\n")

    copy_project(dest, src)
    assert (dest / "params.yaml").read_text() == "lr: 1\n"
    assert (dest / "imgclf" / "a.py").read_text() == "A = 2\n"
    assert (dest / "imgclf" / "new.py").is_file()
    assert not (dest / "metrics").exists() and not (dest / "labelled").exists()
