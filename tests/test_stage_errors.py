"""The one error path: user errors as one `<stage>: error: ...` line, bugs with a traceback,
both exit 1, through real `python -m stages.<name>` processes as DVC runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imgclf import (
    archives,
    dataturks,
    downloads,
    images,
    ingest,
    labels,
    sources,
    splitting,
    torchscript,
)
from imgclf.errors import MissingInput, ParamsError, UserError

ROOT = Path(__file__).resolve().parents[1]


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_project(workdir: Path, manifest: str) -> None:
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "manifest.csv").write_text(manifest, encoding="utf-8")
    (workdir / "params.yaml").write_text((ROOT / "params.yaml").read_text(encoding="utf-8"))


def test_user_error_is_one_line_without_traceback(tmp_path):
    write_project(tmp_path, "file,class,sha256\n")
    done = run_stage("split", tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        "split: error: data/manifest.csv lists no images; run the ingest stage first.\n"
    )


def test_missing_params_file_is_a_user_error(tmp_path):
    done = run_stage("split", tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("split: error: params.yaml not found: run stages from")
    assert "Traceback" not in done.stderr


def test_bad_param_names_its_key(tmp_path):
    write_project(tmp_path, "file,class,sha256\n")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["evaluate"]["min_accuracy"] = "high"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_stage("evaluate", tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "evaluate: error: params.yaml: evaluate.min_accuracy: expected a number >= 0, found 'high'."
    )


def test_bug_keeps_its_traceback(tmp_path):
    # A manifest without the sha256 column cannot come from the ingest stage: a bug here.
    write_project(tmp_path, "file,class\nimages/a/1.jpg,a\n")
    done = run_stage("split", tmp_path)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("split: error: KeyError: 'sha256' (an unexpected error, a bug")


def test_message_says_found_expected_and_what_to_do():
    e = ParamsError("train_tf.steps", found="'abc'", expected="a positive integer")
    assert str(e) == "params.yaml: train_tf.steps: expected a positive integer, found 'abc'."
    e = UserError("data/x.csv, line 3", found="2 columns", expected="3", todo="Re-run ingest.")
    assert str(e) == "data/x.csv, line 3: expected 3, found 2 columns. Re-run ingest."
    assert str(UserError("plain message")) == "plain message"
    assert isinstance(MissingInput("x"), FileNotFoundError)


@pytest.mark.parametrize(
    "cls",
    [
        archives.UnsafeArchiveError,
        dataturks.DataturksError,
        downloads.DownloadError,
        images.BadImage,
        ingest.IngestError,
        labels.ClassNameCollision,
        sources.SourceUnavailable,
        splitting.SplitError,
        torchscript.UnsafePickleError,
    ],
)
def test_every_input_error_is_a_user_error(cls):
    assert issubclass(cls, UserError)
