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
    labels,
    sources,
    splitting,
    torchscript,
)
from imgclf.errors import MissingInput, ParamsError, UserError, first_few
from imgclf.ingest import records
from imgclf.tracking import store

ROOT = Path(__file__).resolve().parents[1]


def run_stage(
    name: str, cwd: Path, *, module: str | None = None, path: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m stages.<name>` (or `module`, found on `path` too) in `cwd`, as DVC runs it."""
    pythonpath = os.pathsep.join(str(p) for p in (ROOT, path) if p is not None)
    env = {**os.environ, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    return subprocess.run(
        [sys.executable, "-m", module or f"stages.{name}"],
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A tab where YAML wants spaces: the commonest slip of an edit by hand.
        ("split:\n\tseed: 0\n", "params.yaml: not valid YAML (line 2, column 1: found character "
         "'\\t' that cannot start any token; YAML indents with spaces, never tabs)."),
        ("split:\n  seed: [0\n", "(line 3, column 1: expected ',' or ']', but got '<stream "
         "end>' (while parsing a flow sequence that starts at line 2))."),
        ("data:\n  source: caf\xe9\n".encode("latin-1"), "params.yaml: not valid YAML (byte 20 "
         "is not UTF-8 text (invalid continuation byte); save it as UTF-8)."),
        ("- split\n", "params.yaml: expected a mapping of sections (data:, split:, train_tf: ...), "
         "found a list."),
        ("split:\n  seed: 0\n", "params.yaml: paths: expected a section of params.yaml, found "
         "none. Put it back (the repository's params.yaml has it);"),
    ],
)  # fmt: skip
def test_a_params_file_that_cannot_be_read_is_named_with_where(tmp_path, text, message):
    # Each was a YAML or KeyError traceback called a bug.
    write_project(tmp_path, "file,class,sha256\n")
    params = tmp_path / "params.yaml"
    params.write_bytes(text if isinstance(text, bytes) else text.encode())
    done = run_stage("split", tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("split: error: params.yaml: "), done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.rstrip().endswith("`git diff params.yaml` shows what changed since the "
                                         "last commit.")  # fmt: skip


# A misspelt key was a KeyError traceback in split, and silently ignored in ingest and track,
# whose blocks were read with a default for whatever key was missing.
BAD_PARAMS = [
    ("evaluate", "evaluate", "min_accuracy", "high", "expected a number >= 0, found 'high'."),
    ("split", "split", "test_fracton", 0.3, "expected one of the keys test_fraction, seed, "
     "min_per_class, found 1 unknown key(s): test_fracton. Check the spelling."),
    ("split", "split", "test_fraction", "0,3", "expected a number between 0 and 1 (exclusive), "
     "found '0,3'."),
    ("source", "ingest", "max_expansion_ratio", "lots", "expected a positive number, found "
     "'lots'."),
    ("ingest", "ingest", "on_multiple_label", "first", "expected one of the keys "
     "on_multiple_labels"),
    ("track", "track", "log_models", "flase", "expected true, false or a non-empty list of "
     "model names, found 'flase'."),
    # A block output finetune_tf cannot train from: refused before half an hour of activations.
    ("activations", "activations", "cut", "mixed_5", "expected a cut finetune_tf can train "
     "from: mixed_7, mixed_8, mixed_9, found 'mixed_5'. Set activations.cut"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "block", "key", "value", "message"),
    BAD_PARAMS,
    ids=[f"{stage}-{block}.{key}" for stage, block, key, *_ in BAD_PARAMS],
)
def test_bad_param_names_its_key(tmp_path, stage, block, key, value, message):
    write_project(tmp_path, "file,class,sha256\n")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params[block][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_stage(stage, tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"{stage}: error: params.yaml: {block}.{key}: {message}"), last_line


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


def test_a_long_list_in_a_message_names_the_first_few_and_counts_the_rest():
    names = [f"img{i}.jpg" for i in range(12)]
    assert first_few(names, 3) == "img0.jpg, img1.jpg, img2.jpg and 9 more"
    assert first_few(names[:3], 3) == "img0.jpg, img1.jpg, img2.jpg"
    assert first_few(names[:2], 1, "; ") == "img0.jpg and 1 more"
    assert first_few([], 3) == ""


@pytest.mark.parametrize(
    "cls",
    [
        archives.UnsafeArchiveError,
        dataturks.DataturksError,
        downloads.DownloadError,
        images.BadImage,
        records.IngestError,
        labels.ClassNameCollision,
        sources.SourceUnavailable,
        splitting.SplitError,
        torchscript.UnsafePickleError,
        store.TrackingStoreError,
    ],
)
def test_every_input_error_is_a_user_error(cls):
    assert issubclass(cls, UserError)


def test_a_full_disk_is_one_line_with_what_to_do_not_a_bug(tmp_path):
    # A real ENOSPC from the kernel (/dev/full), raised under a library's own error, as
    # numpy's, h5py's or TensorFlow's writers wrap it: the machine's state, not a bug.
    (tmp_path / "fill.py").write_text(
        "from imgclf.stage import stage_main\n"
        "@stage_main\n"
        "def main():\n"
        "    try:\n"
        "        with open('/dev/full', 'wb') as f:\n"
        "            f.write(b'x' * 100_000)\n"
        "    except OSError as e:\n"
        "        raise RuntimeError('could not save the model') from e\n"
        "main()\n"
    )
    done = run_stage("fill", tmp_path, module="fill", path=tmp_path,
                     IMGCLF_CACHE_DIR=str(tmp_path / "cache"))  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.startswith("fill: error: the disk is full (No space left on device); ")
    assert f"MiB free in the repository ({tmp_path})" in message
    assert f"MiB free in the cache ({tmp_path / 'cache'})" in message
    assert message.endswith("can move to a larger disk with IMGCLF_CACHE_DIR.")


def test_a_half_written_activations_file_is_removed_when_the_disk_fills(tmp_path):
    # The stage's 4.8 GB train.npy is written under a hidden name first: on a full disk it
    # must go, or it keeps the disk full after the stage has failed.
    import errno

    import numpy as np

    from imgclf.activations import _write_npy

    out = tmp_path / "train.npy"
    hidden = tmp_path / ".train.npy.tmp"
    hidden.symlink_to("/dev/full")  # its writes fail as on a full disk
    rows = (np.zeros((8, 8, 16), np.float16) for _ in range(100))
    with pytest.raises(OSError) as raised:
        _write_npy(out, (100, 8, 8, 16), rows)
    assert raised.value.errno == errno.ENOSPC
    assert not hidden.exists() and not hidden.is_symlink() and not out.exists()


def test_source_checks_the_model_lists_before_dvc_reaches_a_stage_they_leave_without_input(
    tmp_path,
):
    # models: [tf, sklearn] with finetune_keras still listed: DVC itself used to stop at
    # finetune_keras with "No such file or directory: models/heads/keras".
    write_project(tmp_path, "file,class,sha256\n")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["models"] = ["tf", "sklearn"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_stage("source", tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "source: error: params.yaml: finetune_models: expected fine-tuned models whose head "
            "`models:` lists (finetune_keras starts from the keras head)"
        )
    )
