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
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.fileio import sha256_file, write_csv, write_json
from tests.http_server import LoopbackServer, closed_port_url, free_port

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
    # One epoch of each fine-tune; the Keras one with test-time flips (the flip view of the
    # test images), so both scoring paths run. In float32 whatever the CPU (params.yaml's auto
    # is bfloat16 on some): this result's readers compare exports and served models to it at
    # float32 tolerances, on any machine. The pipeline test runs the default.
    for name, flips in (("finetune_tf", False), ("finetune_keras", True)):
        params[name].update(epochs=1, batch_size=8, test_time_flip=flips, precision="float32")
    params["activations"]["test_views"] = ["orig", "flip"]
    # Three train views, not params.yaml's ten: a crop keeps the crop path and one_per_image's
    # draw among more than two views in play, at a third of the ten views' backbone passes.
    params["activations"]["train_views"] = ["orig", "flip", "crop80_tl"]
    # Not the backbone's 299: the fine-tuned models' end-to-end versions (registered, served,
    # label-image) must resize to the side their activations were computed at (9x9 maps).
    params["activations"]["image_size"] = 331
    params["evaluate"]["min_accuracy"] = 0.0
    params["evaluate"]["misclassified_sheet_max"] = 8
    return params


def build_tiny_result(workdir: Path) -> dict:
    """Write a complete pipeline result (data, backbone, bottlenecks, three heads, activations,
    two fine-tuned models, every metric and report) under `workdir`, with the stages' own code;
    returns the params used."""
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
                rows.append(
                    {
                        "class": name,
                        "label": name,
                        "file": rel,
                        "sha256": sha256_file(path),
                        "width": w,
                        "height": h,
                        "format": "JPEG",
                        "origin": f"generated:{seed}",
                        "subset": subset,
                    }
                )
    fields = ["class", "label", "file", "sha256", "width", "height", "format", "origin", "subset"]
    write_csv(split / "manifest.csv", fields, rows)
    write_csv(
        workdir / paths["manifest"], fields[:-1], [{k: r[k] for k in fields[:-1]} for r in rows]
    )

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
        feats = np.concatenate(
            [
                backbone.model(
                    backbone.preprocess(load_rgb(split / r["file"])), training=False
                ).numpy()
                for r in subset_rows
            ]
        )
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
        from imgclf.registry import pipeline_models
        from imgclf.scoring import score_models
        from stages import activations, audit, finetune_keras, finetune_tf, train

        audit.main()
        for head in ("tf", "keras", "sklearn"):
            train.main([head])
        activations.main()
        finetune_tf.main()
        finetune_keras.main()
        evaluation = score_models(
            bottleneck_dir=paths["bottlenecks"],
            models_dir=paths["models"],
            metrics_dir=paths["metrics"],
            split_dir=paths["split"],
            min_accuracy=0.0,
            sheet_max=8,
            heads_source_dir=ROOT / "imgclf" / "heads",
            heads=pipeline_models(params),
            activations_dir=paths["activations"],
        )
        assert evaluation.failures == []
    finally:
        os.chdir(cwd)
    return params


_RESULTS: dict[str, tuple[Path, dict]] = {}


def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny pipeline result per test session, shared by the files that read it (tracking,
    label-image, evaluate, the recipe search) and by the xdist workers: the first to ask builds
    it (~85 s on an AVX2 CPU), under a file lock, the others wait and read it. Tests must not
    modify it."""
    from filelock import FileLock

    if "result" not in _RESULTS:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # the session's folder, above each worker's own
        workdir, done = root / "tiny_result", root / "tiny_result.params.json"
        with FileLock(str(root / "tiny_result.lock")):
            if not done.is_file():
                shutil.rmtree(workdir, ignore_errors=True)  # a build that died half-way
                done.write_text(json.dumps(build_tiny_result(workdir)))
        _RESULTS["result"] = (workdir, json.loads(done.read_text()))
    return _RESULTS["result"]


# --------------------------------------------------------------------------- fast unit tests


def test_repo_root_prefers_dvc_root_then_exp_copy_then_git(tmp_path, monkeypatch):
    from imgclf.config import repo_root

    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "original"))
    assert repo_root(tmp_path) == (tmp_path / "original").resolve()
    monkeypatch.delenv("DVC_ROOT")
    executor = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    executor.mkdir(parents=True)
    assert repo_root(executor) == (tmp_path / "repo").resolve()
    subprocess.run(["git", "init", "-q", str(tmp_path / "g")], check=True)
    (tmp_path / "g" / "sub").mkdir()
    assert repo_root(tmp_path / "g" / "sub") == (tmp_path / "g").resolve()


def test_store_defaults_to_repo_root_and_env_overrides(tmp_path, monkeypatch):
    from imgclf.tracking.store import resolve_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    store = resolve_store()
    assert store.is_default
    assert store.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert store.artifact_root == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    store = resolve_store()
    assert (store.tracking_uri, store.artifact_root, store.is_default) == (
        "http://127.0.0.1:5000",
        None,
        False,
    )


def test_configuring_a_store_leaves_no_registry_behind(tmp_path, monkeypatch):
    """mlflow.set_registry_uri writes MLFLOW_REGISTRY_URI; a later resolve_store (label-image
    after track, in one process) must not take it for the user's and read another registry."""
    from imgclf.tracking.store import configure_store, resolve_store

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    configure_store(tmp_path / "a")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'b.db'}")
    store = resolve_store()
    assert store.registry_uri == store.tracking_uri == f"sqlite:///{tmp_path / 'b.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///user.db")
    configure_store(tmp_path / "c")
    assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///user.db"  # the user's own is kept


def test_a_damaged_store_is_named_and_left_as_it_is(tmp_path, monkeypatch):
    from imgclf.tracking.store import TrackingStoreError, configure_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"<<<<<<< HEAD\n" + bytes(range(256)) * 8)  # a merge gone wrong
    before = db.read_bytes()
    with pytest.raises(TrackingStoreError) as info:
        configure_store(tmp_path)
    assert str(info.value) == (
        f"{db}: MLflow cannot open this store (file is not a database). The file holds the "
        "project's runs and registered models: restore it from a backup, or move it aside (mv "
        f"{db} {db}.damaged) and the next run of the track stage starts a new one."
    )
    assert db.read_bytes() == before


def make_command(folder: Path, *args: str, **environ: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of `make <args>` with the project's Makefile in `folder` (the
    venv this test runs in, taken as set up): this process's environment as a user's shell has
    it, plus `environ`. So without MLFLOW_* (mlflow.set_tracking_uri, in any earlier test of
    this worker, leaves MLFLOW_TRACKING_URI behind) and without MAKE* (under `make test`, the
    inner make would print "Entering directory" lines first)."""
    shutil.copy(ROOT / "Makefile", folder)
    if not (folder / ".venv").exists():
        (folder / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    own = ("MLFLOW_", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)} | environ
    return ["make", "-o", ".venv/bin/activate", "-o", ".dvc/plots/offline.html", *args], env


def make_in(folder: Path, *args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run `make_command` to the end."""
    argv, env = make_command(folder, *args, **environ)
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_make_ui_on_a_damaged_store_stops_with_the_message(tmp_path):
    # Before: a traceback in the middle of make's "MLflow UI: open" line, then a UI over it.
    shutil.copy(ROOT / "params.yaml", tmp_path)
    (tmp_path / "mlflow.db").write_bytes(b"not a database\n" * 100)
    done = make_in(tmp_path, "ui")
    assert done.returncode != 0
    assert f"error: {tmp_path / 'mlflow.db'}: MLflow cannot open this store" in done.stderr
    assert "Traceback" not in done.stderr and "MLflow UI: open" not in done.stdout


def get_when_up(url: str, server: subprocess.Popen, timeout: float = 120.0) -> bytes:
    """GET `url` once the `server` being started answers it; fails the test, with the server's
    output, when it exits first or does not answer within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            log = server.stdout.read() if server.poll() is not None else ""
            log = log.decode(errors="replace") if isinstance(log, bytes) else log
            pytest.fail(f"{url}: no answer from the server (exit {server.poll()}):\n{log}")
        time.sleep(0.5)


def test_make_ui_shows_the_store_that_track_logs_to(tmp_path, monkeypatch):
    # Before: the link came from MLFLOW_TRACKING_URI's store, and the UI served ./mlflow.db,
    # where that experiment id is another experiment or none.
    from mlflow import MlflowClient

    from imgclf.tracking.store import get_or_create_experiment, resolve_store

    monkeypatch.chdir(tmp_path)  # a new store's Default experiment makes ./mlruns
    shutil.copy(ROOT / "params.yaml", tmp_path)
    other = f"sqlite:///{tmp_path / 'team.db'}"
    MlflowClient(other).create_experiment("someone-else")  # tf-or-keras is not the first
    exp_id = get_or_create_experiment("tf-or-keras", resolve_store(tracking_uri=other))
    port = free_port()
    argv, env = make_command(tmp_path, "ui", f"UI_PORT={port}", MLFLOW_TRACKING_URI=other)
    ui = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True,
                          start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        link = ui.stdout.readline().strip()
        assert link == (
            f"MLflow UI: open {base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        )
        shown = json.loads(
            get_when_up(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={exp_id}", ui, 60)
        )
        assert shown["experiment"]["name"] == "tf-or-keras"
        assert not (tmp_path / "mlflow.db").exists()
        # The port taken (by this UI): said before any link, for make ui and make serve.
        for target, instead in (("ui", "UI_PORT"), ("serve", "SERVE_PORT")):
            done = make_in(tmp_path, target, f"{instead}={port}", "MODEL=runs:/0/model")
            assert done.returncode != 0 and done.stdout == "", done.stdout
            assert done.stderr.startswith(
                f"error: port {port} of 127.0.0.1 is in use (an earlier make ui or make serve?): "
                f"stop what listens there, or use another port: make {target} {instead}={port + 1}"
            ), done.stderr
        # A tracking server has its own UI: its link, and nothing started here.
        done = make_in(tmp_path, "ui", "UI_PORT=1", MLFLOW_TRACKING_URI=base)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"MLflow UI: open {base}/#/experiments/{exp_id}/runs?workflowType=machine_learning",
            "(the tracking server's own UI: MLFLOW_TRACKING_URI)",
        ]
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_a_tracking_server_that_does_not_answer_is_named_in_seconds(tmp_path, monkeypatch):
    from imgclf.tracking.store import TrackingStoreError, configure_store

    server = closed_port_url("").rstrip("/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    start = time.monotonic()
    with pytest.raises(TrackingStoreError) as info:
        configure_store(tmp_path)
    # MLflow's client alone retries for about four minutes, then fails with a traceback.
    assert time.monotonic() - start < 20
    assert str(info.value).startswith(
        f"the MLflow tracking server {server} (MLFLOW_TRACKING_URI) does not answer: "
        "connection refused by 127.0.0.1 (3 attempts). Start it, or unset"
    )
    with LoopbackServer({}, statuses={"health": 404}) as srv:  # any answer will do
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.base_url.rstrip("/"))
        assert configure_store(tmp_path).tracking_uri == srv.base_url.rstrip("/")
        assert srv.count("health") == 1


def test_a_deleted_experiment_is_a_user_error_with_what_to_do(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from imgclf.tracking.store import TrackingStoreError, configure_store, get_or_create_experiment

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    store = configure_store(tmp_path)
    MlflowClient(store.tracking_uri).delete_experiment(get_or_create_experiment("x", store))
    with pytest.raises(TrackingStoreError, match=r"'x' is deleted .*mlflow experiments restore"):
        get_or_create_experiment("x", store)


def test_flatten_and_numeric_leaves():
    from imgclf.tracking.contents import flatten, numeric_leaves, param_value

    params = {"train_tf": {"learning_rate": 0.01, "steps": 4000}, "a": {"b": {"c": [1, 2]}}}
    assert flatten(params) == {
        "train_tf.learning_rate": 0.01,
        "train_tf.steps": 4000,
        "a.b.c": [1, 2],
    }
    assert param_value([1, 2]) == "[1, 2]"
    ev = {"accuracy": 0.9, "ci_method": "wilson-95", "ok": True, "per_class": {"r": {"f1": 1}}}
    assert numeric_leaves(ev) == {"accuracy": 0.9, "per_class.r.f1": 1.0}


def test_dvc_lock_hashes(tmp_path):
    from imgclf.tracking.provenance import dvc_lock_hashes

    lock = {
        "schema": "2.0",
        "stages": {
            "split": {
                "outs": [
                    {"path": "data/split/train", "md5": "aa.dir"},
                    {"path": "data/split/manifest.csv", "md5": "bb"},
                ]
            },
            "backbone": {"outs": [{"path": "models/backbone", "md5": "cc.dir"}]},
            "train_tf": {"outs": [{"path": "models/tf_head", "md5": "dd.dir"}]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_lock_hashes(tmp_path / "dvc.lock") == {
        "dvc.split.data/split/train": "aa.dir",
        "dvc.split.data/split/manifest.csv": "bb",
        "dvc.backbone.models/backbone": "cc.dir",
    }
    assert dvc_lock_hashes(tmp_path / "missing.lock") == {}


def test_git_dirty_ignores_pipeline_outputs(tmp_path):
    from imgclf.tracking.provenance import git_info

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    for name in ("params.yaml", "dvc.lock", "metrics/x.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "metrics" / "x.json").write_text("b\n")
    (tmp_path / "untracked.txt").write_text("b\n")
    info = git_info(tmp_path, ignore=("metrics/",))
    assert info["git.dirty"] == "false" and len(info["git.commit"]) == 40
    (tmp_path / "params.yaml").write_text("b\n")
    info = git_info(tmp_path, ignore=("metrics/",))
    assert info["git.dirty"] == "true" and info["git.changed_files"] == "params.yaml"


# --------------------------------------------------------------------------- the track stage


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The tiny result tracked once, with models, in a private default store."""
    import mlflow

    workdir, params = tiny_result(tmp_path_factory)
    store_root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.setenv("DVC_ROOT", str(store_root))
        mp.setenv("DVC_EXP_NAME", "tiny-exp")
        started = time.perf_counter()
        summary = track_result(params, workdir)
        seconds = time.perf_counter() - started
    client = mlflow.MlflowClient(summary["tracking_uri"])
    return {
        "workdir": workdir,
        "params": params,
        "summary": summary,
        "client": client,
        "store_root": store_root,
        "seconds": seconds,
    }


# The served models' pixel cap comes from the run's params: one that is not the default.
SERVED_PIXEL_CAP = 40_000_000


def track_result(params: dict, workdir: Path) -> dict:
    from imgclf.tracking.pipeline_run import track_pipeline

    tracked = {
        **params,
        "ingest": {**params["ingest"], "max_image_pixels": SERVED_PIXEL_CAP},
        "track": {**params["track"], "log_models": True},
    }
    return track_pipeline(tracked, workdir=workdir)


def _runs(client, experiment_id):
    runs = client.search_runs([experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.mark.slow
def test_one_parent_run_a_child_per_model_with_params_metrics_curves_tags(tracked):
    from imgclf.fileio import read_csv, read_json

    client, summary, workdir = tracked["client"], tracked["summary"], tracked["workdir"]
    store_root = tracked["store_root"].resolve()
    assert summary["tracking_uri"] == f"sqlite:///{store_root}/mlflow.db"
    assert (store_root / "mlflow.db").is_file() and (store_root / "mlartifacts").is_dir()
    parents, children = _runs(client, summary["experiment_id"])
    assert [p.info.run_id for p in parents] == [summary["run_id"]]
    parent = parents[0]
    assert parent.info.run_name == "tiny-exp"  # DVC_EXP_NAME names the run
    assert parent.info.artifact_uri.startswith((store_root / "mlartifacts").as_uri())
    # Each child says which result it belongs to.
    assert sorted(c.info.run_name for c in children) == [
        "tiny-exp/finetune_keras",
        "tiny-exp/finetune_tf",
        "tiny-exp/keras",
        "tiny-exp/sklearn",
        "tiny-exp/tf",
    ]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}

    for run in (parent, *children):
        assert run.data.params["train_tf.learning_rate"] == "0.5"
        assert run.data.params["paths.models"] == "models"
        tags = run.data.tags
        assert tags["dvc.exp_name"] == "tiny-exp"
        assert tags["git.commit"]  # "none": the tiny result is not a git checkout
        backbone = read_json(workdir / "models/backbone/backbone.json")
        assert tags["backbone.sha256"] == backbone["sha256"]
        assert tags["data.manifest_sha256"] == sha256_file(workdir / "data/manifest.csv")

    by_name = {c.data.tags["imgclf.head"]: c for c in children}
    for head, run in by_name.items():
        ev = read_json(workdir / f"metrics/evaluate/{head}.json")
        assert run.data.metrics["test.accuracy"] == pytest.approx(ev["accuracy"])
        # Per-class scores are a table artifact, not dozens of single-value metrics.
        assert not [k for k in run.data.metrics if "per_class" in k]
        assert parent.data.metrics[f"{head}.accuracy"] == pytest.approx(ev["accuracy"])
        train = read_json(workdir / f"metrics/train/{head}.json")
        assert run.data.metrics["training_seconds"] == pytest.approx(train["train_seconds"])
        # Settings are params, results are metrics.
        assert run.data.params["train.n_train"] == str(train["n_train"])
        assert "train.n_train" not in run.data.metrics
        assert "train.best_val_accuracy" in run.data.metrics
    assert by_name["tf"].data.params["train.batch_size"] == "8"
    # Names and flags, which metrics/train/<head>.info.json holds, are params too: what a
    # fine-tune's precision: auto resolved to on the machine that trained it, among them.
    assert by_name["tf"].data.params["train.optimizer"] == "sgd"
    assert by_name["sklearn"].data.params["train.converged"] in ("true", "false")
    for name in ("finetune_tf", "finetune_keras"):
        info = read_json(workdir / f"metrics/train/{name}.info.json")
        assert by_name[name].data.params["train.precision"] == info["precision"] == "float32"
    assert by_name["keras"].data.params["train.learning_rate"] == "0.01"
    assert not [k for c in children for k in c.data.metrics if k.split(".")[-1] in (
        "batch_size", "learning_rate", "hidden_units", "dropout")]  # fmt: skip
    # Both heads' curves on one x-axis: step = training images seen = epoch * n_train.
    n_train = read_json(workdir / "metrics/train/tf.json")["n_train"]
    assert n_train == read_json(workdir / "metrics/train/keras.json")["n_train"]
    last_steps = {}
    for head in ("tf", "keras"):
        curve = read_csv(workdir / f"metrics/curves/{head}.csv")
        for key in ("train_loss", "val_accuracy", "epoch"):
            history = client.get_metric_history(by_name[head].info.run_id, f"curve.{key}")
            assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
                (round(float(row["epoch"]) * n_train), pytest.approx(float(row[key])))
                for row in curve
            ]
        last_steps[head] = round(float(curve[-1]["epoch"]) * n_train)
    # 60 SGD steps of 8 and 4 epochs: the same scale, not 60 against 4.
    assert last_steps["tf"] == 60 * 8 and last_steps["keras"] == 4 * n_train
    assert client.get_metric_history(by_name["sklearn"].info.run_id, "curve.val_accuracy") == []
    # The fine-tuned models: their base head and recipe as params, their curve, and the
    # per-block gradient norms of each epoch (the curve CSV's gradient_norm_* columns).
    for head, base in (("finetune_tf", "tf"), ("finetune_keras", "keras")):
        run = by_name[head]
        assert run.data.params["base"] == base
        assert run.data.params[f"{head}.epochs"] == "1"
        assert run.data.params["train.momentum"] == "0.9"
        assert run.data.params["train.test_time_flip"] == str(int(head == "finetune_keras"))
        curve = read_csv(workdir / f"metrics/curves/{head}.csv")
        for block in ("mixed_9", "mixed_10", "head"):
            history = client.get_metric_history(run.info.run_id, f"gradient_norm.{block}")
            assert [(m.step, m.value) for m in history] == [
                (1, pytest.approx(float(curve[0][f"gradient_norm_{block}"])))
            ]
            assert float(curve[0][f"gradient_norm_{block}"]) > 0
        assert len(client.get_metric_history(run.info.run_id, "curve.val_accuracy")) == 1

    # The parent's description links to the TF and Keras curves overlaid on one chart.
    note = parent.data.tags["mlflow.note.content"]
    assert summary["curves_links"]["loss"] in note and "#/metric?runs=" in note
    assert by_name["tf"].info.run_id in note and by_name["keras"].info.run_id in note

    # Train and test sets are dataset inputs of every run (the UI's Dataset column).
    from imgclf.fileio import read_csv as _read_csv

    split_rows = _read_csv(workdir / "data/split/manifest.csv")
    for run in (parent, *children):
        inputs = {
            next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
            for d in client.get_run(run.info.run_id).inputs.dataset_inputs
        }
        assert set(inputs) == {"train", "test"}
        assert inputs["train"].name == "generated-train" and len(inputs["train"].digest) == 16
        assert inputs["train"].digest != inputs["test"].digest
        profile = json.loads(inputs["test"].profile)
        assert profile["num_rows"] == sum(r["subset"] == "test" for r in split_rows)
        assert "generated" in inputs["train"].source


@pytest.mark.slow
def test_artifacts_are_logged(tracked, tmp_path):
    client, summary = tracked["client"], tracked["summary"]
    parent_files = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"params.yaml", "comparison.md", "backbone.json", "label_audit"} <= parent_files
    audit_files = {a.path for a in client.list_artifacts(summary["run_id"], "label_audit")}
    assert audit_files == {f"label_audit/{name}" for name in
                           ("label_issues.csv", "label_issues.png", "audit.json")}  # fmt: skip
    for head in ("tf", "keras", "sklearn", "finetune_tf", "finetune_keras"):
        run_id = summary["heads"][head]["run_id"]
        files = {
            a.path
            for folder in ("evaluation", "evaluation/confusion", "evaluation/misclassified")
            for a in client.list_artifacts(run_id, folder)
        }
        assert {
            f"evaluation/confusion/{head}.png",
            f"evaluation/confusion/{head}.csv",
            f"evaluation/misclassified/{head}.png",
            f"evaluation/misclassified/{head}.csv",
            f"evaluation/{head}.json",
            "evaluation/classification_report.txt",
        } <= files
        assert {"labels.txt", "training"} <= {a.path for a in client.list_artifacts(run_id)}
        table = Path(client.download_artifacts(run_id, "evaluation/per_class.json", str(tmp_path)))
        doc = json.loads(table.read_text())
        assert doc["columns"] == ["class", "precision", "recall", "f1", "support"]
        assert [row[0] for row in doc["data"]] == sorted(CLASSES)
        local = Path(
            client.download_artifacts(
                run_id, "evaluation/classification_report.txt", str(tmp_path / head)
            )
        )
        report = local.read_text()
        assert "accuracy" in report and "red" in report and "macro avg" in report
    # The fine-tune stages' TensorBoard events, as written under paths.tensorboard.
    workdir = tracked["workdir"]
    for head in ("finetune_tf", "finetune_keras"):
        run_id = summary["heads"][head]["run_id"]
        logged = {Path(a.path).name for a in client.list_artifacts(run_id, "tensorboard")}
        written = {p.name for p in (workdir / "logs/tensorboard" / head).iterdir()}
        assert logged == written and any(n.startswith("events.out.tfevents.") for n in logged)
    assert not client.list_artifacts(summary["heads"]["tf"]["run_id"], "tensorboard")


@pytest.mark.slow
def test_registered_models_reproduce_the_evaluate_stage(tracked):
    import mlflow
    import pandas as pd

    from imgclf.fileio import read_json
    from imgclf.heads import load_predictor, model_dir

    client, summary, workdir = tracked["client"], tracked["summary"], tracked["workdir"]
    test = np.load(workdir / "data/bottlenecks/test.npz")
    classes = read_json(workdir / "data/bottlenecks/classes.json")
    # The default names come from the data (data.source = tests/generated), not "flowers".
    for head, name in (("tf", "generated-tf"), ("keras", "generated-keras")):
        versions = client.search_model_versions(f"name='{name}'")
        assert [str(v.version) for v in versions] == ["1"]
        assert versions[0].run_id == summary["heads"][head]["run_id"]
        assert summary["heads"][head]["registered_version"] == "1"
        ev = read_json(workdir / f"metrics/evaluate/{head}.json")
        registered = client.get_registered_model(name)
        assert "Inception V3" in registered.description and "3 classes" in registered.description
        assert f"Test accuracy {ev['accuracy']:.4f}" in versions[0].description
        assert "tests/generated" in versions[0].description
        # min_accuracy 0: the first version passes the gate and is the champion.
        assert client.get_model_version_by_alias(name, "champion").version == versions[0].version
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        assert model.metadata.metadata["labels"] == classes
        assert model.metadata.get_input_schema().input_names() == ["image"]
        # Encoded files in, decoded inside the model with load_rgb.
        answer = model.predict(
            pd.DataFrame(
                {"image": [(workdir / "data/split" / i).read_bytes() for i in test["ids"]]}
            )
        )
        probs = np.array([[row[c] for c in classes] for row in answer["probabilities"]])
        assert list(answer["label"]) == [classes[i] for i in probs.argmax(1)]
        assert list(answer["probability"]) == list(probs.max(1))
        expected = load_predictor(head, model_dir(workdir / "models", head))(test["features"])
        np.testing.assert_allclose(probs, expected, atol=1e-4)
        accuracy = float(np.mean(probs.argmax(1) == test["labels"]))
        assert round(accuracy, 6) == ev["accuracy"]
        # The served pixel cap is the run's ingest.max_image_pixels; a load may change it.
        assert model.model_config == {"max_image_pixels": SERVED_PIXEL_CAP}
        capped = mlflow.pyfunc.load_model(
            f"models:/{name}@champion", model_config={"max_image_pixels": 100}
        )
        image = (workdir / "data/split" / test["ids"][0]).read_bytes()
        row = capped.predict(pd.DataFrame({"image": [image, image]})).iloc[0]
        assert row["label"] is None and row["probabilities"] is None
        assert row["error"].startswith("too_large: "), row["error"]
        assert "> ingest.max_image_pixels=100" in row["error"]
    assert [m.name for m in client.search_registered_models()] == [
        "generated-finetune_keras",
        "generated-finetune_tf",
        "generated-keras",
        "generated-tf",
    ]


@pytest.mark.slow
def test_registered_fine_tuned_models_reproduce_the_evaluate_stage(tracked):
    """The registered end-to-end fine-tuned models (image file in: backbone to the cut, the
    fine-tuned blocks, the head, the flip averaged for finetune_keras) give the probabilities
    the evaluate stage scored on the test activations, within 1e-5."""
    import mlflow
    import pandas as pd

    from imgclf.activations import load_activations
    from imgclf.fileio import read_json
    from imgclf.finetune.common import predict_images, uses_test_time_flip
    from imgclf.heads import load_predictor, model_dir

    client, summary, workdir = tracked["client"], tracked["summary"], tracked["workdir"]
    acts = load_activations(workdir / "data/activations", "test")
    ids = acts.ids[acts.of_view("orig")]
    classes = read_json(workdir / "data/bottlenecks/classes.json")
    flips = {}
    for head in ("finetune_tf", "finetune_keras"):
        name = f"generated-{head}"
        (version,) = client.search_model_versions(f"name='{name}'")
        assert version.run_id == summary["heads"][head]["run_id"]
        assert "fine-tuned" in client.get_registered_model(name).description
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        meta = model.metadata.metadata
        assert meta["labels"] == classes and meta["cut"] == "mixed_8"
        assert meta["image_size"] == 331
        folder = model_dir(workdir / "models", head)
        flips[head] = meta["test_time_flip"]
        assert flips[head] == uses_test_time_flip(folder)
        answer = model.predict(
            pd.DataFrame({"image": [(workdir / "data/split" / i).read_bytes() for i in ids]})
        )
        probs = np.array([[row[c] for c in classes] for row in answer["probabilities"]])
        expected = predict_images(load_predictor(head, folder), acts, test_time_flip=flips[head])
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        ev = read_json(workdir / f"metrics/evaluate/{head}.json")
        assert (
            round(float(np.mean(probs.argmax(1) == acts.labels[acts.of_view("orig")])), 6)
            == (ev["accuracy"])
        )
    assert flips == {"finetune_tf": False, "finetune_keras": True}


@pytest.mark.slow
def test_an_identical_result_registers_no_new_version(tracked, tmp_path):
    """The same weights, labels, backbone and code (a forced rerun, or an experiment that only
    changed the other head) are the same model: its version is reused, nothing is exported and
    no version is added. A renamed registered model gets the logged model."""
    from mlflow import MlflowClient

    # The two frozen heads' models: each export costs ~20 s, and the fine-tuned ones are logged
    # by the same code (the `tracked` fixture registers all four).
    params = {**tracked["params"], "models": ["tf", "keras"], "finetune_models": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DVC_ROOT", str(tmp_path))
        first = track_result(params, tracked["workdir"])
        second = track_result(params, tracked["workdir"])
        renamed = {
            **params,
            "track": {**params["track"], "registered_models": {"tf": "other-tf"}},
        }
        third = track_result(renamed, tracked["workdir"])
    client = MlflowClient(first["tracking_uri"])
    for head in ("tf", "keras"):
        assert second["heads"][head]["model_uri"] == first["heads"][head]["model_uri"]
        assert second["heads"][head]["registered_version"] == "1"
        assert second["heads"][head]["new_version"] is False
        name = first["heads"][head]["registered_model"]
        assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert third["heads"]["tf"]["registered_model"] == "other-tf"
    assert third["heads"]["tf"]["model_uri"] == first["heads"]["tf"]["model_uri"]
    assert third["heads"]["keras"]["registered_version"] == "1"
    # One export per servable model, not one per run.
    assert len(list((tmp_path / "mlartifacts").rglob("saved_model.pb"))) == 2


def test_champion_is_the_latest_tracked_model_that_passes_the_gate(tmp_path):
    # Not the best test accuracy over the versions: that chose the served model on the test
    # set (a float32 build 0.14 points "better" than the bfloat16 one that replaced it kept
    # the alias, with its older serving code), across versions scored on other test images.
    from mlflow import MlflowClient

    from imgclf.tracking.registered import update_champion

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("m")
    for _ in range(4):
        client.create_model_version("m", str(tmp_path), run_id=None)
    history = [
        update_champion(client, "m", "1", passed=True),
        update_champion(client, "m", "2", passed=True),
        update_champion(client, "m", "3", passed=False),  # below the gate: the alias stays
        update_champion(client, "m", "1", passed=True),  # an older result tracked again
        update_champion(client, "m", "4", passed=True),
    ]
    assert history == ["1", "2", "2", "1", "4"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "4"


def test_make_serve_checks_the_model_uri_before_mlflow_starts_a_server(tmp_path, monkeypatch):
    # Before, a name that is not registered (another data set's default, a typo) started
    # `mlflow models serve`, which then failed with a traceback.
    from mlflow import MlflowClient

    from imgclf.tracking.servers import serve_uri
    from imgclf.tracking.store import TrackingStoreError, configure_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "../shared/datasets/flower_photos"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(TrackingStoreError, match=r"no MLflow store at .*run the pipeline first"):
        serve_uri("", root=tmp_path)
    store = configure_store(tmp_path)
    client = MlflowClient(store.tracking_uri, store.registry_uri)
    name = "flower_photos-finetune_keras"  # the default: this data set's fine-tuned Keras model
    client.create_registered_model(name)
    client.create_model_version(name, str(tmp_path), run_id=None)
    client.set_registered_model_alias(name, "champion", "1")
    assert serve_uri("", root=tmp_path) == f"models:/{name}@champion"
    assert serve_uri(f"models:/{name}/1", root=tmp_path) == f"models:/{name}/1"
    assert serve_uri("runs:/abc/model", root=tmp_path) == "runs:/abc/model"  # MLflow's to check
    registered = f"Registered: {name} @champion. Serve one with make serve MODEL=models:/"
    for uri, missing in [
        ("models:/flower-tf@champion", "no registered model 'flower-tf'"),
        (f"models:/{name}@best", f"no alias @best of '{name}'"),
        (f"models:/{name}/2", f"no version 2 of '{name}'"),
    ]:
        with pytest.raises(TrackingStoreError) as info:
            serve_uri(uri, root=tmp_path)
        assert str(info.value).startswith(f"{uri}: {missing} in {store.tracking_uri}. "), uri
        assert registered in str(info.value)
    # Through make, as a user runs it: stopped with the message, no server started.
    done = make_in(tmp_path, "serve", f"MODEL=models:/{name}@best")
    assert done.returncode != 0
    assert f"error: models:/{name}@best: no alias @best of '{name}'" in done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stdout


def test_ui_url_opens_the_runs_in_model_training_mode(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    from imgclf.tracking.servers import ui_url
    from imgclf.tracking.store import configure_store, get_or_create_experiment

    assert ui_url("http://h:5000/", "tf-or-keras", root=tmp_path) == (
        "http://h:5000/#/experiments?workflowType=machine_learning"
    )
    store = configure_store(tmp_path)
    exp_id = get_or_create_experiment("tf-or-keras", store)
    assert ui_url("http://h:5000", "tf-or-keras", root=tmp_path) == (
        f"http://h:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    )
    tags = MlflowClient(store.tracking_uri).get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_dataset_and_registered_model_names_come_from_the_source():
    from imgclf.tracking.registered import dataset_name, registered_model_names

    url = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
    assert dataset_name(url) == "flower_photos"
    assert dataset_name("../shared/datasets/hymenoptera_data/") == "hymenoptera_data"
    assert dataset_name("exports/ants bees.json") == "ants-bees"
    assert dataset_name("") == "images"
    templates = {"tf": "{dataset}-tf", "keras": "my-keras"}
    # A servable model the block does not name gets {dataset}-<model>.
    assert registered_model_names(templates, "data/ants.zip") == {
        "tf": "ants-tf",
        "keras": "my-keras",
        "finetune_tf": "ants-finetune_tf",
        "finetune_keras": "ants-finetune_keras",
    }


def test_log_models_names_the_models_whose_end_to_end_model_is_registered():
    from imgclf.errors import ParamsError
    from imgclf.tracking.registered import logged_models

    heads = ["tf", "keras", "sklearn", "finetune_tf", "finetune_keras"]
    assert logged_models(True, heads) == ["tf", "keras", "finetune_tf", "finetune_keras"]
    assert logged_models(False, heads) == []
    assert logged_models(["finetune_keras"], heads) == ["finetune_keras"]
    # sklearn has no end-to-end model; ncm is not in this pipeline.
    with pytest.raises(ParamsError) as error:
        logged_models(["finetune_keras", "sklearn", "ncm"], heads)
    assert str(error.value).startswith(
        "params.yaml: track.log_models: expected true, false or a list of the pipeline's "
        "servable models: tf, keras, finetune_tf, finetune_keras, found 2 other model(s): "
        "sklearn, ncm."
    )


@pytest.mark.slow
def test_served_model_answers_like_label_image(tracked, tmp_path, monkeypatch, capsys):
    """`make serve` of the registered Keras model (@champion), a real HTTP request on
    127.0.0.1 with the JPEG file in base64, as in MLflow's image example, and label-image
    (pipeline output, and the same registry URI): the label and the same probabilities."""
    import base64

    from imgclf import label_image

    workdir, summary = tracked["workdir"], tracked["summary"]
    image = workdir / "data/split/test/green/green_01.jpg"
    port = free_port()
    # As the README serves it, from a shell where nothing is activated: no venv on PATH (the
    # server starts uvicorn by name, which `.venv/bin/mlflow models serve` alone cannot find).
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PATH", "VIRTUAL_ENV")},
        "MLFLOW_TRACKING_URI": summary["tracking_uri"],
        "PATH": os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]),
    }
    server = subprocess.Popen(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "serve",
            f"VENV={VENV_BIN.parent}",
            "MODEL=models:/generated-keras@champion",
            f"SERVE_PORT={port}",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # label-image meanwhile (the server takes a few seconds to load the model).
        monkeypatch.setenv("MLFLOW_TRACKING_URI", summary["tracking_uri"])
        outputs = {}
        for key, extra in (
            ("local", ["--models-dir", str(workdir / "models")]),
            ("registry", ["--model", "models:/generated-keras@champion"]),
        ):
            code = label_image.main([str(image), "--json", "--no-annotate", *extra])
            assert code == 0
            outputs[key] = json.loads(capsys.readouterr().out)["results"][0]["probabilities"]

        get_when_up(f"http://127.0.0.1:{port}/ping", server)  # mlflow models serve is up
        # One request, three files and three rows that are no file at all: no bad row sinks
        # the others (MLflow's own check refused the whole request over the last three while
        # the signature's column was binary).
        files = [image.read_bytes(), b"CC-BY 2.0\n", image.read_bytes()[:300]]
        rows = [[base64.b64encode(f).decode("ascii")] for f in files]
        rows += [["not base64!"], [None], [7]]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            served, text, cut, not_base64, null, number = json.loads(r.read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert served["error"] is None
    nothing = {"label": None, "probability": None, "probabilities": None}
    assert text == {**nothing, "error": "not_an_image: not an image file Pillow can identify"}
    assert cut == {**nothing, "error": cut["error"]}
    assert cut["error"].startswith(("truncated: ", "corrupt: ")), cut["error"]
    assert not_base64 == {**nothing, "error": not_base64["error"]}
    assert not_base64["error"].startswith("not_base64: text that is not base64"), not_base64
    expected = "not_bytes: expected the bytes of an image file (or base64 text), got "
    assert null == {**nothing, "error": expected + "null"}
    assert number == {**nothing, "error": expected + "int"}
    served_probs = served["probabilities"]
    assert list(served_probs) == sorted(CLASSES)
    assert served["label"] == max(served_probs, key=served_probs.get)
    assert served["probability"] == max(served_probs.values())
    # The served model, the same model loaded by label-image, and the graph label-image builds
    # from the pipeline's outputs: bit-for-bit the same probabilities.
    assert served_probs == outputs["registry"]
    assert served_probs == outputs["local"]


# --------------------------------------------------------------------------- under DVC


def _git_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        DVC_NO_ANALYTICS="1",
    )
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def make_dvc_repo(repo: Path, workdir: Path, params: dict) -> None:
    """A git+DVC repo holding the tiny result, the track code and the `track` stage of the real
    dvc.yaml (the earlier stages' outputs are committed files here, not stages). Models are
    not logged (track.log_models=false): the point is which runs DVC creates, and where."""
    repo.mkdir()
    for rel in ("data/manifest.csv", "data/split/manifest.csv", "models", "metrics",
                "logs/tensorboard"):  # fmt: skip
        src = workdir / rel
        if src.is_dir():
            shutil.copytree(src, repo / rel)
        else:
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    # `litert.models: []` (the tiny result has no LiteRT files): no export@<model> stage, and
    # the two folders track depends on hold only the README.md that git keeps for them.
    for folder in ("models/litert", "metrics/litert"):
        (repo / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / folder / "README.md", repo / folder / "README.md")
    # track does not load the backbone without models: a small stand-in keeps git fast.
    weights = repo / "models/backbone/inception_v3.weights.h5"
    weights.write_bytes(b"stand-in weights")
    shutil.copytree(ROOT / "imgclf", repo / "imgclf", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "stages").mkdir()
    for name in ("__init__.py", "track.py"):
        shutil.copy2(ROOT / "stages" / name, repo / "stages" / name)
    shutil.copy2(ROOT / ".gitignore", repo / ".gitignore")
    tiny = {**params, "track": {**params["track"], "log_models": False}}
    tiny["litert"] = {**params.get("litert", {}), "models": []}
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    track_stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["track"]
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"track": track_stage}}, sort_keys=False)
    )


@pytest.mark.slow
def test_dvc_repro_tracks_each_result_once_and_exp_temp_uses_the_same_store(
    tmp_path_factory, tmp_path
):
    import mlflow

    workdir, params = tiny_result(tmp_path_factory)
    repo = tmp_path / "repo"
    make_dvc_repo(repo, workdir, params)
    env = _git_env()
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny result"], repo, env)

    out = _run(["dvc", "repro"], repo, env)
    assert "Running stage 'track'" in out
    client = mlflow.MlflowClient(f"sqlite:///{repo.resolve()}/mlflow.db")

    def parents():
        exps = client.search_experiments()
        runs = client.search_runs([e.experiment_id for e in exps], max_results=100)
        return [r for r in runs if "mlflow.parentRunId" not in r.data.tags], runs

    first, runs = parents()
    assert len(first) == 1 and len(runs) == 6  # the parent and five models
    assert first[0].data.tags["git.dirty"] == "false"
    assert first[0].data.tags["git.commit"] == _run(["git", "rev-parse", "HEAD"], repo, env).strip()
    run_json = json.loads((repo / "metrics/mlflow_run.json").read_text())
    assert run_json["run_id"] == first[0].info.run_id

    out = _run(["dvc", "repro"], repo, env)  # nothing changed: skipped, no run
    assert "Running stage 'track'" not in out
    assert len(parents()[1]) == 6

    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tracked"], repo, env)
    out = _run(
        ["dvc", "exp", "run", "--temp", "-n", "tiny-temp", "-S", "track.experiment=tiny-temp-exp"],
        repo,
        env,
    )
    now, runs = parents()
    assert len(now) == 2 and len(runs) == 12, out
    new = next(r for r in now if r.info.run_id != first[0].info.run_id)
    assert new.data.tags["dvc.exp_name"] == "tiny-temp"
    assert new.info.run_name == "tiny-temp"
    # It ran in DVC's temporary copy of the repo, and still landed in the repo's own store.
    assert ".dvc/tmp/exps/" in new.data.tags["imgclf.workdir"]
    assert first[0].data.tags["imgclf.workdir"] == str(repo.resolve())
    assert client.get_experiment(new.info.experiment_id).name == "tiny-temp-exp"
    assert new.info.artifact_uri.startswith((repo.resolve() / "mlartifacts").as_uri())
    assert not list((repo / ".dvc").rglob("mlflow.db"))
    assert list((repo / "mlartifacts").rglob("classification_report.txt"))
