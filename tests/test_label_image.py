"""label-image: top-k output, annotated copies, charts, and one clear line per bad input.

The models are the tiny pipeline result of test_tracking.py (real Inception V3 architecture with
random weights, real heads): what is checked is the command, not the accuracy on flowers.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf import label_image
from imgclf.images import BadImage, load_rgb
from tests.helpers import as_unprivileged, make_image
from tests.http_server import closed_port_url
from tests.test_tracking import CLASSES, VENV_BIN, tiny_result


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    workdir, _ = tiny_result(tmp_path_factory)
    return workdir / "models"


@pytest.fixture
def photo(tmp_path, shared_datasets_or_none) -> Path:
    """A real flower photo when ../shared is present (read in place, never copied into the
    repo), else a generated JPEG."""
    if shared_datasets_or_none is not None:
        found = sorted((shared_datasets_or_none / "flower_photos" / "roses").glob("*.jpg"))
        if found:
            return found[0]
    return make_image(tmp_path / "photo.jpg", size=(320, 240), seed=3)


@pytest.fixture
def shared_datasets_or_none(request) -> Path | None:
    try:
        return request.getfixturevalue("shared_datasets")
    except pytest.skip.Exception:
        return None


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    code = label_image.main(argv)
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("label-image:")]
    return code, captured.out, err_lines


def test_help_runs_as_a_console_script():
    # The entry point declared in pyproject.toml; --help must not need TensorFlow.
    proc = subprocess.run(
        [str(VENV_BIN / "label-image"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--model" in proc.stdout and "--chart" in proc.stdout


@pytest.mark.slow
def test_annotated_copy_and_table(photo, models_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, errors = run(
        [str(photo), "--models-dir", str(models_dir), "--head", "tf", "-o", str(out_dir)], capsys
    )
    assert code == 0 and errors == []
    lines = out.splitlines()
    assert lines[0].split() == ["image", "#", "label", "confidence"]
    assert len(lines) == 1 + 3  # top 3 of the 3 classes
    assert lines[1].startswith(str(photo))
    assert {line.split()[-2] for line in lines[1:]} == set(CLASSES)

    annotated = out_dir / f"{photo.stem}.labelled.png"
    source = load_rgb(photo)
    drawn = np.asarray(Image.open(annotated).convert("RGB"))
    assert drawn.shape == source.shape  # the image as displayed, same width and height
    # The label box is at the top left: those pixels changed, the far corner did not.
    h, w = source.shape[:2]
    box = (slice(0, max(4, h // 20)), slice(0, max(4, w // 10)))
    assert np.mean(np.any(drawn[box] != source[box], axis=-1)) > 0.9
    corner = (slice(h - h // 4, h), slice(w - w // 4, w))
    assert np.array_equal(drawn[corner], source[corner])
    # The box holds text: more than the one fill colour.
    assert len(np.unique(drawn[: h // 8, : w // 4].reshape(-1, 3), axis=0)) > 2


@pytest.mark.slow
def test_json_batch_with_bad_inputs(models_dir, tmp_path, capsys):
    folder = tmp_path / "batch"
    good = [make_image(folder / f"img_{i}.jpg", size=(60 + 10 * i, 50), seed=i) for i in range(2)]
    (folder / "notes.txt").write_text("not an image, and not picked from a folder\n")
    single = make_image(tmp_path / "single.png", size=(33, 71), seed=9, fmt="PNG")
    not_image = tmp_path / "fake.jpg"
    not_image.write_text("this is text with a .jpg name\n")
    missing = tmp_path / "missing.jpg"
    argv = [str(folder), str(missing), str(not_image), str(single)]
    code, out, errors = run(
        [*argv, "--models-dir", str(models_dir), "--json", "-k", "2", "-o", str(tmp_path / "o")],
        capsys,
    )
    assert code == 1
    assert len([e for e in errors if ": error: " in e]) == 2
    assert f"label-image: {folder}: 1 files that are not images, not labelled" in errors  # notes
    assert any(str(missing) in e and "no such file" in e for e in errors)
    assert any(str(not_image) in e and "not an image" in e for e in errors)
    doc = json.loads(out)
    assert [r["image"] for r in doc["results"]] == [*map(str, good), str(single)]
    assert {e["image"] for e in doc["errors"]} == {str(missing), str(not_image)}
    for r in doc["results"]:
        assert len(r["top"]) == 2
        assert r["top"][0]["confidence"] >= r["top"][1]["confidence"]
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["top"][0]["confidence"] == max(r["probabilities"].values())
        assert Path(r["annotated"]).is_file()
        assert Image.open(r["annotated"]).size == (r["width"], r["height"])
    assert doc["results"][2]["width"] == 33 and doc["results"][2]["height"] == 71


@pytest.mark.slow
def test_csv_and_chart(models_dir, tmp_path, capsys):
    image = make_image(tmp_path / "a.jpg", size=(90, 60), seed=1)
    code, out, errors = run(
        [
            str(image),
            "--models-dir",
            str(models_dir),
            "--csv",
            "--chart",
            "-o",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0 and errors == []
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert {r["label"] for r in rows} == set(CLASSES)
    chart = Image.open(tmp_path / "o" / "a.chart.png")
    assert chart.width > chart.height  # the image and the bars side by side
    assert np.asarray(chart.convert("RGB")).std() > 10


def test_unreadable_model_uri_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    image = make_image(tmp_path / "a.jpg", seed=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    for model in ("models:/no-such-model/1", str(tmp_path / "not-a-model-dir"), "runs:/abc/m"):
        code, out, errors = run([str(image), "--model", model, "--no-annotate"], capsys)
        assert code == 2, model
        assert len(errors) == 1 and "cannot load model" in errors[0] and model in errors[0]
        assert out == ""


def test_a_tracking_server_that_does_not_answer_is_one_line_in_seconds(
    tmp_path, monkeypatch, capsys
):
    image = make_image(tmp_path / "a.jpg", seed=2)
    server = closed_port_url("").rstrip("/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    start = time.monotonic()
    code, out, errors = run([str(image), "--model", "models:/m@champion", "--no-annotate"], capsys)
    assert time.monotonic() - start < 20  # not MLflow's four minutes of silent retries
    assert (code, out, len(errors)) == (2, "", 1)
    assert f"the MLflow tracking server {server} (MLFLOW_TRACKING_URI) does not answer" in errors[0]


def test_output_names_never_collide_even_where_case_does_not_count(tmp_path):
    names = label_image.OutputNames(tmp_path)
    inputs = ["a/photo.jpg", "b/photo.jpg", "photo-2.png", "c/Photo.JPG", "PHOTO.png"]
    stems = [names.stem(Path(p)) for p in inputs]
    assert stems == ["photo", "photo-2", "photo-2-2", "Photo-3", "PHOTO-4"]
    assert len({s.casefold() for s in stems}) == len(stems)  # one file each on macOS too


def test_missing_models_dir_is_one_line(tmp_path, capsys):
    image = make_image(tmp_path / "a.jpg", seed=2)
    code, _, errors = run([str(image), "--models-dir", str(tmp_path / "nope")], capsys)
    assert code == 2 and len(errors) == 1
    assert "nope/backbone" in errors[0] and "dvc repro" in errors[0]


def test_an_out_dir_that_cannot_be_made_is_one_line_before_any_model(tmp_path, capsys):
    image = make_image(tmp_path / "a.jpg", seed=2)
    taken = tmp_path / "taken"
    taken.write_text("a file where the folder should go\n")
    # A models dir that does not exist: the out-dir check comes first, and alone.
    code, out, errors = run([str(image), "-o", str(taken), "--models-dir", "nope"], capsys)
    assert code == 2 and out == ""
    assert errors == [
        f"label-image: error: --out-dir {taken}: cannot make that folder (File exists); give "
        "another with -o, or --no-annotate"
    ]


@pytest.mark.slow
def test_an_annotated_copy_that_cannot_be_written_is_the_outputs_fault(
    models_dir, tmp_path, capsys
):
    image = make_image(tmp_path / "a.jpg", seed=2)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "a.labelled.png").symlink_to("/dev/full")  # a full disk, for real
    argv = [str(image), "--models-dir", str(models_dir), "--head", "tf", "-o", str(out_dir)]
    code, _, errors = run([*argv, "--json"], capsys)
    assert code == 1
    assert errors == [
        f"label-image: error: {image}: cannot write {out_dir / 'a.labelled.png'} (No space left "
        "on device)"
    ]
    assert not (out_dir / "a.labelled.png").exists()  # nothing half-written left


def test_a_format_ingest_refuses_is_refused_before_the_model_sees_it(tmp_path):
    # Pillow reads an ICO; ingest refuses it, so no model was trained on one. label_one
    # decodes first: the predictor (None here) is never reached.
    icon = tmp_path / "favicon.ico"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(icon)
    with pytest.raises(BadImage) as info:
        label_image.label_one(icon, None, top_k=1, names=None, chart=False)
    assert info.value.reason == "unsupported_format"
    assert label_image._image_error(info.value).startswith("unsupported_format: ICO image; ")


def test_only_bad_inputs_exit_1_without_loading_a_model(tmp_path, capsys):
    url = "https://example.com/rose.jpg"  # read as a file name, it names nothing
    code, out, errors = run([str(tmp_path / "a.jpg"), str(tmp_path), url, "--json"], capsys)
    assert code == 1 and len(errors) == 3
    assert json.loads(out)["results"] == []
    assert (
        f"{url}: a URL: label-image reads files; download it first (curl -O <url>)" in (errors[2])
    )


def test_folders_are_read_by_content_and_odd_files_named_as_ingest_names_them(
    models_dir, tmp_path, capsys
):
    # A JPEG named photo.txt or without an extension (ingest keeps images by content) was
    # skipped in a folder without a word; a 0-byte file was "not an image", not empty_file;
    # a name that is not UTF-8 broke the table on a strict terminal.
    folder = tmp_path / "mixed"
    jpeg = make_image(tmp_path / "src.jpg", seed=3).read_bytes()
    (folder).mkdir()
    (folder / "photo.txt").write_bytes(jpeg)
    (folder / "noext").write_bytes(jpeg)
    (folder / "README").write_text("notes\n")
    (folder / "empty.jpg").write_bytes(b"")
    odd = Path(os.fsdecode(bytes(folder) + b"/caf\xe9.jpg"))
    odd.write_bytes(jpeg)
    code, out, errors = run([str(folder), "--models-dir", str(models_dir), "--no-annotate"], capsys)
    assert code == 1
    labelled = [line.split()[0] for line in out.splitlines()[1:] if line and not line[0].isspace()]
    assert sorted(Path(n).name for n in labelled) == ["caf\\xe9.jpg", "noext", "photo.txt"]
    assert any("empty.jpg: empty_file" in e for e in errors)
    assert any("1 files that are not images, not labelled" in e for e in errors)
    out.encode("utf-8")  # strict: no lone surrogate left


def test_inputs_this_user_cannot_read_are_problems_not_a_crash(world_tmp):
    # An image in a folder this user cannot enter, a folder it cannot list inside the folder
    # given, and a folder it may list but not enter: each a problem line, the rest labelled.
    make_image(world_tmp / "locked" / "a.jpg")
    make_image(world_tmp / "pics" / "ok.jpg")
    make_image(world_tmp / "pics" / "private" / "b.jpg")
    make_image(world_tmp / "listed" / "c.jpg")
    (world_tmp / "locked").chmod(0o700)
    (world_tmp / "pics" / "private").chmod(0o700)
    (world_tmp / "listed").chmod(0o744)
    args = [str(world_tmp / "locked" / "a.jpg"), str(world_tmp / "pics"), str(world_tmp / "listed")]
    files, problems = as_unprivileged(lambda: label_image.expand_inputs(args))
    assert files == [world_tmp / "pics" / "ok.jpg"]
    assert problems == [
        (args[0], "cannot be read (Permission denied)"),
        (str(world_tmp / "pics" / "private"), "a folder this user cannot list: not labelled"),
        (str(world_tmp / "listed" / "c.jpg"), "this user cannot read it: not labelled"),
        (args[2], "folder has no image files"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["finetune_tf", "finetune_keras"])
def test_fine_tuned_models_label_like_the_evaluate_stage(head, tmp_path_factory, capsys):
    """`--head finetune_*`: the end-to-end fine-tuned model built from the pipeline's outputs
    (backbone to the cut, fine-tuned blocks, head; finetune_keras averages the flip) gives the
    probabilities the stage's own model gives on the test activations, within 1e-5."""
    from imgclf.activations import load_activations
    from imgclf.finetune.common import predict_images, uses_test_time_flip
    from imgclf.heads import load_predictor, model_dir

    workdir, _ = tiny_result(tmp_path_factory)
    acts = load_activations(workdir / "data/activations", "test")
    ids = acts.ids[acts.of_view("orig")][:4]
    images = [str(workdir / "data/split" / i) for i in ids]
    models = workdir / "models"
    code, out, errors = run(
        [*images, "--models-dir", str(models), "--head", head, "--json", "--no-annotate"], capsys
    )
    assert code == 0 and errors == []
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == images
    labels = sorted(CLASSES)
    got = np.array([[r["probabilities"][c] for c in labels] for r in results])
    folder = model_dir(models, head)
    flip = uses_test_time_flip(folder)
    assert flip == (head == "finetune_keras")
    expected = predict_images(load_predictor(head, folder), acts, test_time_flip=flip)[:4]
    np.testing.assert_allclose(got, expected, atol=1e-5)
