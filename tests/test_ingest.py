"""The ingest stage end to end on real files: class trees, Dataturks exports served over real
HTTP on 127.0.0.1, the real exports and a sample of the real flower photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import unicodedata
import urllib.parse
from collections import Counter
from pathlib import Path

import pytest
import yaml

from imgclf.fileio import read_csv, read_metrics, sha256_file
from imgclf.ingest.outputs import MANIFEST_FIELDS, format_summary
from imgclf.ingest.records import IngestError, IngestOptions
from imgclf.ingest.run import run_ingest
from imgclf.labels import ClassNameCollision, class_dir_name, class_dirs, safe_file_name
from imgclf.sources import ResolvedSource, SourceUnavailable, fingerprint_source, resolve_source
from tests.helpers import as_unprivileged, make_class_tree, make_image
from tests.http_server import LoopbackServer
from tests.test_dataturks import write_export
from tests.test_images import exif_rotated_jpeg, png_header_only

ROOT = Path(__file__).resolve().parents[1]


def options(**overrides) -> IngestOptions:
    base = {
        "min_images_per_class": 2,
        "download_workers": 4,
        "download_timeout_s": 2.0,
        "download_retries": 0,
    }
    return IngestOptions(**{**base, **overrides})


def tree_source(path: Path) -> ResolvedSource:
    return ResolvedSource(source=str(path), kind="tree", path=path, origin=str(path))


def export_source(path: Path) -> ResolvedSource:
    return ResolvedSource(source=str(path), kind="dataturks", path=path, origin=str(path))


def ingest(source: ResolvedSource, out: Path, opts: IngestOptions | None = None):
    return run_ingest(
        source,
        opts or options(),
        images_dir=out / "data" / "images",
        manifest=out / "data" / "manifest.csv",
        metrics_dir=out / "metrics",
        log=lambda _: None,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256: what 'untouched' and 'identical' mean."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def skipped(out: Path) -> dict[str, str]:
    return {r["origin"]: r["reason"] for r in read_csv(out / "metrics" / "ingest_skipped.csv")}


def manifest(out: Path) -> dict[str, dict[str, str]]:
    return {r["file"]: r for r in read_csv(out / "data" / "manifest.csv")}


def item(content: str, labels, status: str = "done") -> dict:
    annotation = None if labels is None else {"labels": labels, "note": ""}
    return {
        "content": content,
        "annotation": annotation,
        "extras": None,
        "metadata": {"status": status},
    }


# ------------------------------------------------------------------------------- trees


@pytest.fixture
def messy_tree(tmp_path) -> Path:
    src = make_class_tree(tmp_path / "src", {"cats": 4, "dogs": 4}, seed=1)
    cats, dogs = src / "cats", src / "dogs"
    (cats / "empty.jpg").write_bytes(b"")
    good = (cats / "img_0001.jpg").read_bytes()
    (cats / "truncated.jpg").write_bytes(make_image(tmp_path / "t.jpg", seed=99).read_bytes()[:300])
    (dogs / "notes.txt").write_text("not an image\n")
    png_header_only(dogs / "bomb.png", 50_000, 50_000)
    make_image(dogs / "cmyk.jpg", mode="CMYK", seed=5)
    make_image(dogs / "gray.png", mode="L", seed=6)
    make_image(cats / "palette.gif", mode="P", seed=7)
    exif_rotated_jpeg(cats / "rotated.jpg", size=(64, 48), orientation=6)
    make_image(cats / "deeper" / "nested.jpg", seed=8)
    (cats / "a_copy.jpg").write_bytes((cats / "img_0000.jpg").read_bytes())  # in-class duplicate
    (dogs / "same_as_a_cat.jpg").write_bytes(good)  # cross-class duplicate
    (src / "LICENSE.txt").write_text("CC-BY 2.0\n")
    make_image(src / "stray.jpg", seed=9)
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (dogs / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return src


def test_tree(messy_tree, tmp_path):
    before = snapshot(messy_tree)
    out = tmp_path / "out"
    result = ingest(tree_source(messy_tree), out)

    rows = read_csv(out / "data" / "manifest.csv")
    assert tuple(rows[0]) == MANIFEST_FIELDS
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    by_file = manifest(out)
    assert sorted(by_file) == [
        "cats/a_copy.jpg",  # smaller name than img_0000.jpg: the copy that is kept
        "cats/img_0002.jpg",
        "cats/img_0003.jpg",
        "cats/nested.jpg",
        "cats/palette.gif",
        "cats/rotated.jpg",
        "dogs/cmyk.jpg",
        "dogs/gray.png",
        "dogs/img_0000.jpg",
        "dogs/img_0001.jpg",
        "dogs/img_0002.jpg",
        "dogs/img_0003.jpg",
    ]
    assert by_file["cats/rotated.jpg"] | {} == {
        "class": "cats",
        "label": "cats",
        "file": "cats/rotated.jpg",
        "sha256": sha256_file(messy_tree / "cats" / "rotated.jpg"),
        "width": "48",  # after EXIF orientation
        "height": "64",
        "format": "JPEG",
        "origin": "cats/rotated.jpg",
    }
    assert by_file["cats/nested.jpg"]["origin"] == "cats/deeper/nested.jpg"
    assert by_file["cats/palette.gif"]["format"] == "GIF"
    # Original bytes, never re-encoded.
    for row in rows:
        copied = out / "data" / "images" / row["file"]
        assert sha256_file(copied) == row["sha256"] == sha256_file(messy_tree / row["origin"])

    assert skipped(out) == {
        ".git/": "ignored",
        "dogs/.DS_Store": "ignored",
        "LICENSE.txt": "not_an_image",
        "stray.jpg": "unlabelled",
        "cats/empty.jpg": "empty_file",
        "cats/truncated.jpg": "truncated",
        "cats/img_0000.jpg": "duplicate",
        "cats/img_0001.jpg": "cross_class_duplicate",
        "dogs/same_as_a_cat.jpg": "cross_class_duplicate",
        "dogs/notes.txt": "not_an_image",
        "dogs/bomb.png": "too_large",
    }
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["images"] == 12 and metrics["classes"] == 2
    assert metrics["per_class"] == {"cats": 6, "dogs": 6}
    assert metrics["skipped_total"] == 11
    assert metrics["skipped"]["cross_class_duplicate"] == 2
    assert metrics["duplicates_dropped"] == 1
    assert metrics["cross_class_duplicates"] == {"mode": "drop", "contents": 1, "files_dropped": 2}
    assert read_csv(out / "metrics" / "ingest_classes.csv") == [
        {"class": "cats", "images": "6"},
        {"class": "dogs", "images": "6"},
    ]
    assert result.usable

    # The input is untouched; a re-run replaces every output with identical bytes.
    assert snapshot(messy_tree) == before
    first = snapshot(out)
    (out / "data" / "images" / "cats" / "stale.jpg").write_bytes(b"left over")
    ingest(tree_source(messy_tree), out)
    assert snapshot(out) == first
    assert snapshot(messy_tree) == before


def test_cross_class_duplicates_keep(messy_tree, tmp_path):
    out = tmp_path / "out"
    ingest(tree_source(messy_tree), out, options(cross_class_duplicates="keep"))
    by_file = manifest(out)
    assert by_file["cats/img_0001.jpg"]["sha256"] == by_file["dogs/same_as_a_cat.jpg"]["sha256"]
    assert "cross_class_duplicate" not in skipped(out).values()


def test_labels_differing_only_in_case_are_an_error(tmp_path):
    src = make_class_tree(tmp_path / "src", {"Cat": 3, "cat": 3, "dog": 3})
    with pytest.raises(
        IngestError, match=r"(?s)'Cat' -> 'Cat', 'cat' -> 'cat'\n.*Rename the labels"
    ):
        ingest(tree_source(src), tmp_path / "out")


def test_unusable_tree_fails_after_writing_reports(tmp_path):
    src = make_class_tree(tmp_path / "src", {"big": 5, "small": 2, "empty": 0})
    (src / "empty").mkdir()
    (src / "small" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out"
    with pytest.raises(IngestError) as info:
        ingest(tree_source(src), out, options(min_images_per_class=3))
    message = str(info.value)
    # The empty folder is not a class: only `small` is too small.
    assert "fewer than ingest.min_images_per_class=3 images (small: 2)" in message
    assert "small/broken.jpg: truncated" in message
    assert "dvc exp run -S ingest.min_images_per_class=N" in message
    assert read_metrics(out / "metrics" / "ingest.json")["usable"] is False
    assert read_metrics(out / "metrics" / "ingest.json")["empty_classes"] == ["empty"]
    assert skipped(out) == {"small/broken.jpg": "truncated"}
    assert not (out / "data" / "images").exists()

    only_one = make_class_tree(tmp_path / "one", {"a": 5})
    with pytest.raises(IngestError, match="a classifier needs at least 2"):
        ingest(tree_source(only_one), tmp_path / "out1")


def test_input_inside_the_output_is_refused(tmp_path):
    out = tmp_path / "out"
    src = make_class_tree(out / "data" / "images", {"a": 3, "b": 3})
    with pytest.raises(IngestError, match="overlaps the output folder"):
        ingest(tree_source(src), out)
    assert len(snapshot(src)) == 6


def test_an_export_inside_the_output_is_refused(tmp_path):
    # Its images elsewhere, the export itself in the folder ingest replaces: it was read, then
    # deleted with the old image set.
    pics = make_class_tree(tmp_path / "pics", {"x": 4})
    records = [
        item(str(path), ["a" if i % 2 else "b"])
        for i, path in enumerate(sorted((pics / "x").iterdir()))
    ]
    out = tmp_path / "out"
    (out / "data" / "images").mkdir(parents=True)
    export = write_export(out / "data" / "images" / "export.json", records)
    with pytest.raises(IngestError, match="overlaps the output folder"):
        ingest(export_source(export), out)
    assert export.is_file()


# ------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("label", "folder"),
    [
        ("roses", "roses"),
        ("Rose\u0301", "Ros\u00e9"),  # NFD -> NFC
        ("a/b\\c", "a_b_c"),
        ("..", ""),
        ("../etc", "_etc"),
        (".hidden", "hidden"),
        ("tab\there\x00nul", "tab_here_nul"),  # control characters, tab included
        ("  spaced   out  ", "spaced out"),
        ('why?: "no"', "why__ _no_"),
        ("trailing. ", "trailing"),
    ],
)
def test_class_dir_name(label, folder):
    assert class_dir_name(label) == folder


def test_safe_file_name():
    assert safe_file_name("photo.jpg") == "photo.jpg"
    assert safe_file_name("../../etc/passwd.png") == "passwd.png"
    assert safe_file_name("C:\\x\\y.gif") == "y.gif"
    assert safe_file_name(".hidden.jpg") == "hidden.jpg"
    assert safe_file_name("noext", ".png") == "noext.png"
    assert safe_file_name("", ".jpg") == "image.jpg"
    long = safe_file_name("x" * 300 + ".jpg")
    assert long.endswith(".jpg") and len(long.encode()) <= 150
    assert safe_file_name("y" * 300 + ".jpg") != safe_file_name("y" * 299 + "z.jpg")
    # Text after the last dot that is too long for an extension is part of the name.
    assert len(safe_file_name("a." + "x" * 300).encode()) == 150


def test_labels_that_collapse_to_one_folder_are_an_error():
    assert class_dirs(["a", "b", ".."]) == {"a": "a", "b": "b"}
    with pytest.raises(ClassNameCollision, match="'a/b' -> 'a_b', 'a_b' -> 'a_b'"):
        class_dirs(["a/b", "a_b", "c"])


# ------------------------------------------------------------------------------- Dataturks


def test_dataturks_local_items_and_safe_class_names(tmp_path):
    folder = tmp_path / "export"
    make_class_tree(folder / "pics", {"x": 6}, seed=3)
    pics = sorted((folder / "pics" / "x").iterdir())
    nfd = unicodedata.normalize("NFD", "Rosé")
    records = [
        item("pics/x/img_0000.jpg", ["a/b"]),
        item("pics/x/img_0001.jpg", ["a/b"]),
        item(pics[2].as_uri(), [nfd]),  # file:// URL
        item(str(pics[3]), ["Rosé"]),  # absolute path; the same label in NFC
        {"content": "pics/x/img_0004.jpg", "annotation": {"label": "..hidden"}},
        {"content": "pics/x/img_0005.jpg", "annotation": {"labels": "..hidden"}, "metadata": None},
        item("pics/x/missing.jpg", ["a/b"]),
        item("pics/x/img_0005.jpg", None, status="skipped"),
        item("pics/x/img_0004.jpg", None, status="NOT_DONE"),
    ]
    export = write_export(folder / "export.json", records)
    out = tmp_path / "out"
    ingest(export_source(export), out)
    rows = read_csv(out / "data" / "manifest.csv")
    assert [(r["class"], r["label"], r["file"], r["origin"]) for r in rows] == [
        ("Rosé", "Rosé", "Rosé/img_0002.jpg", pics[2].as_uri()),
        ("Rosé", "Rosé", "Rosé/img_0003.jpg", str(pics[3])),
        ("a_b", "a/b", "a_b/img_0000.jpg", "pics/x/img_0000.jpg"),
        ("a_b", "a/b", "a_b/img_0001.jpg", "pics/x/img_0001.jpg"),
        ("hidden", "..hidden", "hidden/img_0004.jpg", "pics/x/img_0004.jpg"),
        ("hidden", "..hidden", "hidden/img_0005.jpg", "pics/x/img_0005.jpg"),
    ]
    assert unicodedata.is_normalized("NFC", rows[0]["class"])
    reasons = [(r["origin"], r["reason"]) for r in read_csv(out / "metrics" / "ingest_skipped.csv")]
    assert reasons == [
        ("pics/x/img_0004.jpg", "unlabelled"),
        ("pics/x/img_0005.jpg", "skipped"),
        ("pics/x/missing.jpg", "missing_file"),
    ]


def test_dataturks_over_http(tmp_path):
    served = tmp_path / "served"
    files = {}
    for i in range(8):
        label = "cat" if i % 2 else "dog"
        files[f"{label}/{i}.jpg"] = make_image(served / f"{i}.jpg", seed=100 + i).read_bytes()
    # Two different pictures that Dataturks stored as "<uuid>___photo.jpg": same original name.
    files["u1/0b6f2a1c-1111-4c2d-9e3f-000000000001___photo.jpg"] = make_image(
        served / "p1.jpg", seed=201
    ).read_bytes()
    files["u2/0b6f2a1c-2222-4c2d-9e3f-000000000002___photo.jpg"] = make_image(
        served / "p2.jpg", seed=202
    ).read_bytes()
    files["slow.jpg"] = make_image(served / "slow.jpg", seed=203).read_bytes()
    files["fine.png"] = make_image(served / "fine.png", seed=204, fmt="PNG").read_bytes()

    with LoopbackServer(
        files, delays={"slow.jpg": 5}, statuses={"gone.jpg": 404}, endless=["live.jpg"]
    ) as srv:
        records = [
            item(srv.url(f"{'cat' if i % 2 else 'dog'}/{i}.jpg"), ["cat" if i % 2 else "dog"])
            for i in range(8)
        ]
        records += [
            item(srv.url("u1/0b6f2a1c-1111-4c2d-9e3f-000000000001___photo.jpg"), ["cat"]),
            item(srv.url("u2/0b6f2a1c-2222-4c2d-9e3f-000000000002___photo.jpg"), ["cat"]),
            item(srv.url("gone.jpg"), ["dog"]),
            item(srv.url("slow.jpg"), ["dog"]),
            item(srv.url("fine.png"), "dog"),  # a single string
            item(srv.url("cat/1.jpg"), ["cat"]),  # the same URL twice: one download
            item(srv.url("live.jpg"), ["dog"]),  # never ends: cut off at the images' limit
        ]
        export = write_export(tmp_path / "export.json", records)
        out = tmp_path / "out"
        start = time.monotonic()
        opts = options(download_timeout_s=0.5, max_image_pixels=100_000)
        result = ingest(export_source(export), out, opts)
        elapsed = time.monotonic() - start
        assert srv.count("cat/1.jpg") == 1
        url_of_dog_0 = srv.url("dog/0.jpg")
        # A re-run gives identical bytes, from the download cache.
        first = snapshot(out)
        srv.reset_counts()
        ingest(export_source(export), out, opts)
        assert snapshot(out) == first
        assert srv.count("dog/0.jpg") == 0

    assert elapsed < 4, "a slow server must time out, not hold the run"
    by_file = manifest(out)
    photos = sorted(f for f in by_file if "photo" in f)
    assert len(photos) == 2 and all(f.startswith("cat/photo_") for f in photos)
    assert sorted(by_file[f]["sha256"][:10] for f in photos) == [f[10:20] for f in photos]
    assert by_file["dog/fine.png"]["format"] == "PNG"
    assert by_file["dog/0.jpg"]["origin"] == url_of_dog_0
    rows = read_csv(out / "metrics" / "ingest_skipped.csv")
    reasons = {(r["origin"].rsplit("/", 1)[-1], r["reason"]) for r in rows}
    assert reasons == {
        ("gone.jpg", "download_failed"),
        ("slow.jpg", "download_failed"),
        ("live.jpg", "download_failed"),
        ("1.jpg", "duplicate"),
    }
    detail = {r["origin"].rsplit("/", 1)[-1]: r["detail"] for r in rows}
    assert "404" in detail["gone.jpg"]
    assert detail["live.jpg"].endswith(
        "the body went on, cut off: over the limit of 1,848,576 bytes (8 bytes a pixel of "
        "ingest.max_image_pixels=100,000); nothing kept"
    )
    assert result.stats["downloads"] == {"requested": 14, "failed": 3}
    assert read_metrics(out / "metrics" / "ingest.json")["per_class"] == {"cat": 6, "dog": 5}


def test_a_url_that_answers_with_a_web_page_is_skipped_and_fetched_again_next_run(tmp_path):
    # A dead image host often answers 200 with its "not found" page. Kept in the download
    # cache, that page would be every later run's answer, even once the host is back.
    page = b"<!DOCTYPE html><html><head><title>Image\n not found</title></head></html>"
    files = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", seed=i).read_bytes() for i in range(4)}
    files |= {"moved.jpg": page, "gone.jpg": page, "broken.jpg": b"\xff\xd8\xff not a JPEG"}
    with LoopbackServer(files) as srv:
        records = [item(srv.url(f"{i}.jpg"), ["cat" if i % 2 else "dog"]) for i in range(4)]
        records += [item(srv.url(name), ["cat"]) for name in ("moved.jpg", "gone.jpg")]
        records += [item(srv.url("moved.jpg"), ["cat"]), item(srv.url("broken.jpg"), ["dog"])]
        export = write_export(tmp_path / "export.json", records)
        ingest(export_source(export), tmp_path / "out")
        rows = {
            r["origin"].rsplit("/", 1)[-1]: r
            for r in read_csv(tmp_path / "out" / "metrics" / "ingest_skipped.csv")
        }
        assert {name: row["reason"] for name, row in rows.items()} == {
            "moved.jpg": "not_an_image",
            "gone.jpg": "not_an_image",
            "broken.jpg": "corrupt",
        }
        assert rows["gone.jpg"]["detail"].endswith(
            "not an image file Pillow can identify: the URL answered with a web page (titled "
            "'Image not found'). The download was not kept: the next run fetches the URL again"
        )
        assert "web page" not in rows["broken.jpg"]["detail"]
        assert "the next run fetches the URL again" in rows["broken.jpg"]["detail"]

        # The host is back: the next run fetches those URLs, and only those.
        srv.files["/moved.jpg"] = make_image(tmp_path / "moved.jpg", seed=9).read_bytes()
        srv.reset_counts()
        ingest(export_source(export), tmp_path / "out")
        assert srv.count("moved.jpg") == 1 and srv.count("gone.jpg") == 1
        assert srv.count("0.jpg") == 0  # a good image stays in the cache
    assert skipped(tmp_path / "out") == {
        srv.url("gone.jpg"): "not_an_image",
        srv.url("broken.jpg"): "corrupt",
        srv.url("moved.jpg"): "duplicate",  # listed twice: now one image, kept once
    }
    assert manifest(tmp_path / "out")["cat/moved.jpg"]["origin"] == srv.url("moved.jpg")


def test_an_export_from_a_url_names_images_relative_to_it_and_never_a_local_file(tmp_path):
    # Before, its relative paths were looked for in the download cache, and its absolute paths
    # and file:// URLs were read from this machine: a downloaded export could copy the user's
    # own photos into the data set (and from there into MLflow).
    from imgclf.sources import resolve_source

    private = [make_image(tmp_path / "private" / f"p{i}.jpg", seed=i) for i in range(2)]
    files = {f"exports/pics/{i}.jpg": make_image(tmp_path / f"{i}.jpg", seed=10 + i).read_bytes()
             for i in range(2)}  # fmt: skip
    files |= {f"other/{i}.jpg": make_image(tmp_path / f"o{i}.jpg", seed=20 + i).read_bytes()
              for i in range(2)}  # fmt: skip
    records = [item(str(private[0]), ["cat"]), item(private[1].as_uri(), ["cat"])]
    records += [item(f"pics/{i}.jpg", ["dog"]) for i in range(2)]  # beside the export
    records += [item(f"/other/{i}.jpg", ["cat"]) for i in range(2)]  # the same host's root
    files["exports/x.json"] = write_export(tmp_path / "x.json", records).read_bytes()
    with LoopbackServer(files) as srv:
        source = resolve_source(srv.url("exports/x.json"))
        ingest(source, tmp_path / "out", options(min_images_per_class=2))
    origins = {row["origin"] for row in manifest(tmp_path / "out").values()}
    assert origins == {srv.url(f"exports/pics/{i}.jpg") for i in range(2)} | {
        srv.url(f"other/{i}.jpg") for i in range(2)
    }
    rows = read_csv(tmp_path / "out" / "metrics" / "ingest_skipped.csv")
    # An absolute path is one on the export's host, as a browser reads a link: a 404 there.
    on_host = urllib.parse.urljoin(srv.url("exports/x.json"), str(private[0]))
    assert [(r["origin"], r["reason"]) for r in rows] == [
        (private[1].as_uri(), "local_file_refused"),
        (on_host, "download_failed"),
    ]
    assert "HTTP 404" in rows[1]["detail"]
    assert rows[0]["detail"].endswith(
        f"an export downloaded from {srv.url('exports/x.json')} names images by URL, or by a "
        "path relative to its own URL, never a file of this machine: not read"
    )


@pytest.fixture
def multi_label_export(tmp_path) -> Path:
    make_class_tree(tmp_path / "pics", {"p": 9}, seed=4)
    labels = [
        ["cat"],
        ["cat"],
        ["cat"],
        ["dog"],
        ["dog"],
        ["dog"],
        ["cat", "dog"],
        ["bird", "cat"],
        ["cat"],
    ]
    records = [item(f"pics/p/img_{i:04d}.jpg", lab) for i, lab in enumerate(labels)]
    return write_export(tmp_path / "multi.json", records)


def test_multiple_labels_error(multi_label_export, tmp_path):
    with pytest.raises(IngestError) as info:
        ingest(export_source(multi_label_export), tmp_path / "out")
    message = str(info.value)
    assert "multi.json:7: the item has 2 labels ('cat', 'dog')" in message
    assert "lines 7, 8" in message and "ingest.on_multiple_labels=skip" in message
    assert not (tmp_path / "out").exists()  # refused before anything is read or written


def test_multiple_labels_first(multi_label_export, tmp_path):
    out = tmp_path / "out"
    ingest(
        export_source(multi_label_export),
        out,
        options(on_multiple_labels="first", min_images_per_class=1),
    )
    metrics = read_metrics(out / "metrics" / "ingest.json")
    # No empty "dog"-only or "cat"-only extra classes from the labels that were not chosen.
    assert metrics["per_class"] == {"bird": 1, "cat": 5, "dog": 3}
    assert metrics["multiple_labels"] == {"mode": "first", "items": 2}
    assert metrics["skipped_total"] == 0


def test_multiple_labels_skip(multi_label_export, tmp_path):
    out = tmp_path / "out"
    ingest(export_source(multi_label_export), out, options(on_multiple_labels="skip"))
    assert read_metrics(out / "metrics" / "ingest.json")["per_class"] == {"cat": 4, "dog": 3}
    rows = read_csv(out / "metrics" / "ingest_skipped.csv")
    assert [(r["origin"], r["reason"], r["detail"]) for r in rows] == [
        ("pics/p/img_0006.jpg", "multiple_labels", "line 7: cat, dog"),
        ("pics/p/img_0007.jpg", "multiple_labels", "line 8: bird, cat"),
    ]


def test_a_malformed_line_is_skipped_with_its_number_and_the_rest_ingested(tmp_path):
    folder = tmp_path / "export"
    make_class_tree(folder / "pics", {"cat": 3, "dog": 3}, seed=4)
    lines = [
        json.dumps(item(f"pics/{c}/img_000{i}.jpg", [c])) for c in ("cat", "dog") for i in range(3)
    ]
    lines.insert(3, '{"content": "pics/cat/x.jpg", "annot')  # a line cut short
    lines.append("42")  # valid JSON, not an object
    # Nested deeper than Python's JSON reader follows: its RecursionError is one bad line too.
    lines.append('{"content": ' + "[" * 100_000 + "]" * 100_000 + "}")
    export = folder / "bad.json"
    export.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    messages: list[str] = []
    run_ingest(
        export_source(export),
        options(),
        images_dir=out / "data" / "images",
        manifest=out / "data" / "manifest.csv",
        metrics_dir=out / "metrics",
        log=messages.append,
    )
    assert len(manifest(out)) == 6
    rows = read_csv(out / "metrics" / "ingest_skipped.csv")
    assert [(r["origin"], r["reason"]) for r in rows] == [
        ("bad.json:4", "bad_line"),
        ("bad.json:8", "bad_line"),
        ("bad.json:9", "bad_line"),
    ]
    assert rows[0]["detail"].startswith("invalid JSON (")
    assert rows[2]["detail"].startswith("invalid JSON (nested too deeply to read, column 1): ")
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["bad_lines"] == {"mode": "skip", "lines": [4, 8, 9]}
    assert metrics["items"] == metrics["images"] + metrics["skipped_total"] == 9
    assert "malformed export lines skipped: 3 (line 4, 8, 9;" in messages[0]

    with pytest.raises(IngestError, match=r"bad\.json:4: invalid JSON"):
        ingest(export_source(export), tmp_path / "strict", options(on_bad_line="error"))


# ------------------------------------------------------------------------------- real data


def test_real_classification_export_with_dead_urls(shared_datasets, tmp_path):
    export = shared_datasets / "dataturks" / "gaa_county_classification.json"
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(IngestError) as info:
        ingest(export_source(export), out, options(download_timeout_s=2.0, download_retries=0))
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "0 class(es) with images" in message
    assert "download_failed 277" in message
    assert "https://countyclassifier.s3-us-west-2.amazonaws.com/" in message
    assert "point data.source at a local copy" in message
    rows = read_csv(out / "metrics" / "ingest_skipped.csv")
    assert len(rows) == 277 and {r["reason"] for r in rows} == {"download_failed"}
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["downloads"] == {"requested": 277, "failed": 277}
    # Four labels, none with a usable image: no class at all, each one reported.
    assert metrics["per_class"] == {} and len(metrics["empty_classes"]) == 4


def test_real_bbox_export_is_refused_at_once(shared_datasets, tmp_path):
    export = shared_datasets / "dataturks" / "tcs_face_recognition_bbox.json"
    start = time.monotonic()
    with pytest.raises(
        IngestError, match=r"not an image-classification export.*IMAGE_BOUNDING_BOX"
    ):
        ingest(export_source(export), tmp_path / "out")
    assert time.monotonic() - start < 2
    assert not (tmp_path / "out").exists()


def test_flower_photos_sample(shared_datasets, tmp_path):
    flowers = shared_datasets / "flower_photos"
    src = tmp_path / "flower_photos"
    for folder in sorted(p for p in flowers.iterdir() if p.is_dir()):
        (src / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:8]:
            shutil.copy2(photo, src / folder.name / photo.name)
    quirks = [
        "roses/15922772266_1167a06620.jpg",
        "tulips/15922772266_1167a06620.jpg",
        "sunflowers/14889392928_9742aed45b_m.jpg",
        "sunflowers/15066430311_fb57fa92b0_m.jpg",
    ]
    for rel in quirks:
        shutil.copy2(flowers / rel, src / rel)
    shutil.copy2(flowers / "LICENSE.txt", src / "LICENSE.txt")
    before = snapshot(src)
    expected = {d.name: len(list(d.iterdir())) for d in src.iterdir() if d.is_dir()}

    out = tmp_path / "out"
    ingest(tree_source(src), out, options(min_images_per_class=5))
    metrics = read_metrics(out / "metrics" / "ingest.json")
    expected["roses"] -= 1
    expected["tulips"] -= 1
    expected["sunflowers"] -= 1
    assert metrics["per_class"] == expected
    assert skipped(out) == {
        "LICENSE.txt": "not_an_image",
        "roses/15922772266_1167a06620.jpg": "cross_class_duplicate",
        "tulips/15922772266_1167a06620.jpg": "cross_class_duplicate",
        # Same bytes: the smaller name is kept.
        "sunflowers/15066430311_fb57fa92b0_m.jpg": "duplicate",
    }
    assert "sunflowers/14889392928_9742aed45b_m.jpg" in manifest(out)
    first = snapshot(out)
    ingest(tree_source(src), out, options(min_images_per_class=5))
    assert snapshot(out) == first
    assert snapshot(src) == before


# ------------------------------------------------------------------------------- the stage


def write_params(root: Path, source: str, **ingest_params) -> None:
    # The repository's ingest block (every key is required), with a small class minimum and a
    # download that gives up fast.
    ingest = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["ingest"]
    params = {
        "data": {"source": source},
        "ingest": {
            **ingest,
            "min_images_per_class": 3,
            "download": {"workers": 2, "timeout_s": 2, "retries": 0},
            **ingest_params,
        },
        "paths": {"images": "data/images", "manifest": "data/manifest.csv", "metrics": "metrics"},
    }
    (root / "params.yaml").write_text(json.dumps(params), encoding="utf-8")  # JSON is YAML


def test_stage_main(tmp_path, monkeypatch, capsys):
    from stages.ingest import main

    make_class_tree(tmp_path / "input" / "flowers", {"daisy": 4, "roses": 3}, seed=7)
    (tmp_path / "input" / "flowers" / "LICENSE.txt").write_text("CC-BY\n")
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, "../input/flowers")
    monkeypatch.chdir(project)
    main()
    summary = capsys.readouterr().out
    assert "ingest: 7 images in 2 classes from ../input/flowers (tree)" in summary
    assert "daisy       4" in summary and "not_an_image       1" in summary
    assert len(read_csv(project / "data" / "manifest.csv")) == 7
    assert read_metrics(project / "metrics" / "ingest.json")["source"] == "../input/flowers"

    write_params(project, "../input/flowers", min_images_per_class=4)
    with pytest.raises(SystemExit, match=r"(?s)ingest: error: .*\(roses: 3\)"):
        main()


# ------------------------------------------------------------------- awkward trees


def presplit_tree(root: Path, subsets: dict[str, int]) -> Path:
    """The Keras tutorial's layout: <root>/<subset>/{ants,bees}/*.jpg."""
    for k, (subset, n) in enumerate(subsets.items()):
        make_class_tree(root / subset, {"ants": n, "bees": n}, seed=10 + k)
    return root


def run_split(workdir: Path, ingested: Path) -> tuple[dict, str]:
    """The real split stage on what ingest wrote into `ingested`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(
        images=str(ingested / "data" / "images"),
        manifest=str(ingested / "data" / "manifest.csv"),
        split=str(workdir / "split"),
        metrics=str(workdir / "metrics"),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.split"], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return read_metrics(workdir / "metrics" / "split.json"), done.stdout


def test_a_pre_split_tree_takes_its_classes_inside_and_its_val_folder_is_the_test_set(tmp_path):
    src = presplit_tree(tmp_path / "hymenoptera_data", {"train": 6, "val": 3})
    out = tmp_path / "out"
    messages: list[str] = []
    run_ingest(
        tree_source(src),
        options(),
        images_dir=out / "data" / "images",
        manifest=out / "data" / "manifest.csv",
        metrics_dir=out / "metrics",
        log=messages.append,
    )
    rows = read_csv(out / "data" / "manifest.csv")
    assert {r["class"] for r in rows} == {"ants", "bees"}  # not {"train", "val"}
    given = {r["origin"]: r["given_subset"] for r in rows}
    assert len(given) == 18
    assert all(v == ("test" if o.startswith("val/") else "train") for o, v in given.items())
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["per_class"] == {"ants": 9, "bees": 9}
    assert metrics["presplit"] == {
        "mode": "keep",
        "folders": {"train": "train", "val": "test"},
        "images": {"train": 12, "test": 6},
    }
    assert "pre-split tree (train/ -> train, val/ -> test)" in messages[0]

    split, printed = run_split(tmp_path / "work", out)
    assert split["method"] == "given"
    assert split["given_from"] == {"train": ["train"], "test": ["val"]}
    assert split["per_class"] == {"ants": {"train": 6, "test": 3}, "bees": {"train": 6, "test": 3}}
    assert "your pre-split tree's split, kept" in printed
    test_rows = [r for r in read_csv(tmp_path / "work" / "split" / "manifest.csv")]
    assert {r["origin"].split("/")[0] for r in test_rows if r["subset"] == "test"} == {"val"}


def test_an_empty_stray_folder_does_not_turn_a_pre_split_tree_into_classes(tmp_path):
    # train/ and val/ beside an empty checkpoints/: read as the classes train and val before,
    # a classifier of the folder names, without an error.
    src = presplit_tree(tmp_path / "hymenoptera_data", {"train": 6, "val": 3})
    (src / "checkpoints" / "empty").mkdir(parents=True)
    out = tmp_path / "out"
    ingest(resolve_source(str(src)), out)
    assert {r["class"] for r in read_csv(out / "data" / "manifest.csv")} == {"ants", "bees"}


def test_a_labelled_train_folder_beside_an_unlabelled_test_folder_is_refused(tmp_path):
    # Kaggle's layout: train/<class>/ and a test/ of unlabelled images. As a class tree it
    # would give the classes train and test.
    root = tmp_path / "kaggle"
    make_class_tree(root / "train", {"cats": 4, "dogs": 4})
    make_class_tree(root, {"test": 5})
    with pytest.raises(SourceUnavailable, match=r"test holds no class folders .*kaggle/train"):
        resolve_source(str(root))
    # val/ and test/ with class folders but no train/: refused too, not read as two classes.
    make_class_tree(tmp_path / "notrain" / "val", {"cats": 3})
    make_class_tree(tmp_path / "notrain" / "test", {"cats": 3})
    with pytest.raises(SourceUnavailable, match=r"they are no pre-split tree: a train folder"):
        resolve_source(str(tmp_path / "notrain"))
    # Classes that happen to be called train and test, holding their images: a class tree.
    plain = tmp_path / "plain"
    make_class_tree(plain, {"train": 4, "test": 4})
    ingest(resolve_source(str(plain)), tmp_path / "out")
    assert {r["class"] for r in read_csv(tmp_path / "out/data/manifest.csv")} == {"train", "test"}


def test_pre_split_with_val_and_test_pools_val_into_train(tmp_path):
    src = presplit_tree(tmp_path / "data", {"train": 5, "validation": 2, "test": 3})
    out = tmp_path / "out"
    ingest(tree_source(src), out)
    rows = read_csv(out / "data" / "manifest.csv")
    subsets = Counter((r["origin"].split("/")[0], r["given_subset"]) for r in rows)
    assert subsets == {("train", "train"): 10, ("validation", "train"): 4, ("test", "test"): 6}
    assert read_metrics(out / "metrics" / "ingest.json")["presplit"]["folders"] == {
        "test": "test",
        "train": "train",
        "validation": "train",
    }


def test_pre_split_pool_re_splits_with_our_stratified_split(tmp_path):
    src = presplit_tree(tmp_path / "data", {"train": 6, "val": 4})
    out = tmp_path / "out"
    ingest(tree_source(src), out, options(presplit="pool"))
    rows = read_csv(out / "data" / "manifest.csv")
    assert tuple(rows[0]) == MANIFEST_FIELDS  # no given_subset: split stratifies as usual
    assert Counter(r["class"] for r in rows) == {"ants": 10, "bees": 10}
    assert read_metrics(out / "metrics" / "ingest.json")["presplit"]["folders"] == {
        "train": "pooled",
        "val": "pooled",
    }
    split, _ = run_split(tmp_path / "work", out)
    assert split["method"] == "stratified"
    assert split["per_class"] == {"ants": {"train": 8, "test": 2}, "bees": {"train": 8, "test": 2}}


def test_folders_named_like_subsets_holding_images_are_classes(tmp_path):
    src = make_class_tree(tmp_path / "src", {"train": 3, "test": 3})  # no inner folders
    out = tmp_path / "out"
    ingest(tree_source(src), out)
    assert read_metrics(out / "metrics" / "ingest.json")["per_class"] == {"test": 3, "train": 3}
    assert "presplit" not in read_metrics(out / "metrics" / "ingest.json")


def test_images_from_sub_folders_are_counted_per_class(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cats": 3, "dogs": 3})
    make_image(src / "cats" / "2019" / "a.jpg", seed=70)
    make_image(src / "cats" / "2019" / "deep" / "b.jpg", seed=71)
    make_image(src / "dogs" / "extra" / "c.jpg", seed=72)
    out = tmp_path / "out"
    result = run_ingest(
        tree_source(src),
        options(),
        images_dir=out / "data" / "images",
        manifest=out / "data" / "manifest.csv",
        metrics_dir=out / "metrics",
        log=lambda _: None,
    )
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["from_subfolders"] == {"images": 3, "per_class": {"cats": 2, "dogs": 1}}
    assert "from sub-folders of class folders (flattened into their class): 3 images (cats 2, " in (
        format_summary(result)
    )


def test_links_out_of_the_tree_are_refused_unread_and_links_inside_followed(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cats": 3, "dogs": 3})
    outside = make_class_tree(tmp_path / "elsewhere", {"birds": 3}, seed=5)
    (src / "cats" / "outside.jpg").symlink_to(outside / "birds" / "img_0000.jpg")
    (src / "cats" / "passwd.jpg").symlink_to("/etc/passwd")
    (src / "cats" / "nothing.jpg").symlink_to(tmp_path / "no-such-file")
    (src / "birds").symlink_to(outside / "birds", target_is_directory=True)
    (src / "dogs" / "more").symlink_to(outside / "birds", target_is_directory=True)
    (src / "dogs" / "inside.jpg").symlink_to(src / "cats" / "img_0002.jpg")  # inside: followed
    (src / "kittens").symlink_to(src / "cats", target_is_directory=True)  # another class's folder
    out = tmp_path / "out"
    result = run_ingest(
        tree_source(src),
        options(cross_class_duplicates="keep"),
        images_dir=out / "data" / "images",
        manifest=out / "data" / "manifest.csv",
        metrics_dir=out / "metrics",
        log=lambda _: None,
    )
    assert skipped(out) == {
        "birds/": "link_outside",
        "cats/outside.jpg": "link_outside",
        "cats/passwd.jpg": "link_outside",
        "cats/nothing.jpg": "broken_link",
        "dogs/more/": "link_outside",
        "kittens/": "linked_class",
    }
    rows = read_csv(out / "metrics" / "ingest_skipped.csv")
    assert all("/etc/passwd" not in r["detail"] or "not read" in r["detail"] for r in rows)
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["per_class"] == {"cats": 3, "dogs": 4}  # dogs/inside.jpg is read
    assert metrics["links_refused"] == 4
    assert metrics["items"] == metrics["images"] + metrics["skipped_total"]
    # Named in the summary too, the linked class folders (a whole class left out) first.
    assert (
        "symbolic links to outside the source tree, not read: 4 (birds/, dogs/more/, "
        "cats/outside.jpg and 1 more)"
    ) in format_summary(result)
    # The fingerprint leaves the same links out: data outside the tree never changes it.
    before = fingerprint_source(tree_source(src))
    make_image(outside / "birds" / "img_9999.jpg", seed=77)
    assert fingerprint_source(tree_source(src)) == before


def test_an_empty_class_folder_is_reported_not_a_class(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cats": 3, "dogs": 3})
    (src / "empty").mkdir()
    (src / "only_junk").mkdir()
    (src / "only_junk" / "notes.txt").write_text("no image here\n")
    out = tmp_path / "out"
    result = run_ingest(
        tree_source(src),
        options(min_images_per_class=3),
        images_dir=out / "data" / "images",
        manifest=out / "data" / "manifest.csv",
        metrics_dir=out / "metrics",
        log=lambda _: None,
    )
    assert result.usable
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["per_class"] == {"cats": 3, "dogs": 3}
    assert metrics["empty_classes"] == ["empty", "only_junk"]
    assert sorted(p.name for p in (out / "data" / "images").iterdir()) == ["cats", "dogs"]
    assert "folders without any usable image, not classes: empty, only_junk" in format_summary(
        result
    )

    (src / "dogs").rename(tmp_path / "gone")
    with pytest.raises(IngestError, match=r"1 class\(es\) with images \(cats; without any usable"):
        ingest(tree_source(src), tmp_path / "out2", options(min_images_per_class=3))


def test_names_that_are_not_utf8_are_read_with_escapes_not_a_crash(tmp_path):
    # Latin-1 names, as copied from an old Windows share or extracted from an old tar: Python
    # hands them out with a lone surrogate per undecodable byte, which no UTF-8 file can hold.
    src = make_class_tree(tmp_path / "src", {"daisy": 3})
    latin1 = os.fsdecode(b"caf\xe9s")
    make_class_tree(src, {latin1: 3}, seed=1)
    make_image(src / "daisy" / os.fsdecode(b"\xe9t\xe9.jpg"), seed=90)
    (src / "daisy" / os.fsdecode(b"cass\xe9.jpg")).write_bytes(b"not an image")
    (src / os.fsdecode(b"lis\xe9z-moi.txt")).write_text("a note beside the classes")
    before = fingerprint_source(tree_source(src))
    out = tmp_path / "out"
    result = ingest(tree_source(src), out)

    assert result.class_counts == {"caf_xe9s": 3, "daisy": 4}
    assert result.labels["caf_xe9s"] == "caf\\xe9s"  # the manifest's label, escaped, readable
    rows = manifest(out)
    assert rows["daisy/_xe9t_xe9.jpg"]["origin"] == "daisy/\\xe9t\\xe9.jpg"
    assert {r["label"] for r in rows.values()} == {"caf\\xe9s", "daisy"}
    # Reported, not a crash.
    assert skipped(out) == {"daisy/cass\\xe9.jpg": "not_an_image",
                            "lis\\xe9z-moi.txt": "not_an_image"}  # fmt: skip
    metrics = read_metrics(out / "metrics" / "ingest.json")
    assert metrics["not_utf8"]["files"] == 6  # 3 in the class folder, 2 in daisy/, 1 beside
    summary = format_summary(result)
    assert "file paths that are not UTF-8, read with each such byte as \\xNN: 6 (e.g. " in summary
    # The source's fingerprint hashes the names' own bytes: another undecodable byte is
    # another source.
    daisy = src / "daisy"
    os.rename(daisy / os.fsdecode(b"\xe9t\xe9.jpg"), daisy / os.fsdecode(b"\xe8t\xe9.jpg"))
    assert fingerprint_source(tree_source(src))["sha256"] != before["sha256"]


def test_lone_surrogates_in_an_export_are_escaped_labels_or_bad_items(tmp_path):
    # JSON can spell half of a character ("\ud83c"): in a label it is kept escaped, in a path
    # or URL it names nothing (no request is made), and neither stops the run.
    folder = tmp_path / "export"
    make_class_tree(folder / "pics", {"x": 6}, seed=3)
    records = [item(f"pics/x/img_000{i}.jpg", ["a" if i < 3 else "b\ud83c"]) for i in range(6)]
    records += [item("pics/x/\ud83c.jpg", ["a"]), item("http://127.0.0.1:9/\ud83c.jpg", ["a"])]
    out = tmp_path / "out"
    result = ingest(export_source(write_export(folder / "export.json", records)), out)
    assert result.labels == {"a": "a", "b_ud83c": "b\\ud83c"}
    assert skipped(out) == {"pics/x/\\ud83c.jpg": "bad_item",
                            "http://127.0.0.1:9/\\ud83c.jpg": "bad_item"}  # fmt: skip
    assert read_metrics(out / "metrics" / "ingest.json")["downloads"]["requested"] == 0


def test_what_this_user_cannot_read_is_reported_not_dropped(world_tmp):
    # Photos copied from another account: a folder nobody may list, one it may list but not
    # enter, a file it may not open. Each is a skip row; the rest ingests; the fingerprint
    # counts them and changes once they are readable. (Root reads anything, so the run drops
    # to nobody: as_unprivileged.)
    src = make_class_tree(world_tmp / "src", {"cats": 4, "dogs": 3, "owls": 3, "bats": 2})
    make_image(src / "cats" / "more" / "deep.jpg", seed=99)
    (src / "cats" / "more").chmod(0o000)  # not listable
    (src / "owls").chmod(0o744)  # others may list it, not enter it
    (src / "dogs" / "img_0001.jpg").chmod(0o000)  # not readable
    (src / "bats").chmod(0o000)  # a whole class
    out = world_tmp / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)

    def run() -> tuple[dict, dict]:
        return fingerprint_source(tree_source(src)), ingest(tree_source(src), out).class_counts

    fingerprint, counts = as_unprivileged(run)
    assert counts == {"cats": 4, "dogs": 2}
    assert skipped(out) == {
        "bats/": "unreadable",
        "cats/more/": "unreadable",
        "dogs/img_0001.jpg": "unreadable",
        **{f"owls/img_{i:04d}.jpg": "unreadable" for i in range(3)},
    }
    rows = {r["origin"]: r["detail"] for r in read_csv(out / "metrics/ingest_skipped.csv")}
    assert rows["cats/more/"].startswith("a folder this user cannot list or enter")
    assert rows["owls/img_0000.jpg"].startswith("listed, but this user cannot open it")
    assert rows["dogs/img_0001.jpg"].startswith("PermissionError: [Errno 13]")
    assert read_metrics(out / "metrics" / "ingest.json")["items"] == 12
    assert "bats" in read_metrics(out / "metrics" / "ingest.json")["empty_classes"]
    # 4 + 2 readable files; bats/, cats/more/, owls' three and dogs' one by name only.
    assert (fingerprint["files"], fingerprint["unreadable"]) == (6, 6)
    for folder in ("cats/more", "owls", "bats"):
        (src / folder).chmod(0o755)
    (src / "dogs" / "img_0001.jpg").chmod(0o644)
    readable = fingerprint_source(tree_source(src))
    assert readable["files"] == 13 and "unreadable" not in readable
    assert readable["sha256"] != fingerprint["sha256"]


def test_export_items_this_user_cannot_read_are_reported(world_tmp):
    folder = world_tmp / "export"
    make_class_tree(folder / "pics", {"x": 4, "y": 3, "z": 2}, seed=5)
    (folder / "pics" / "y").chmod(0o744)  # listed, not entered
    (folder / "pics" / "x" / "img_0003.jpg").chmod(0o000)
    lines = [item(f"pics/x/img_000{i}.jpg", ["a"]) for i in range(4)]
    lines += [item(f"pics/y/img_000{i}.jpg", ["b"]) for i in range(3)]
    lines += [item(f"pics/z/img_000{i}.jpg", ["c"]) for i in range(2)]
    export = write_export(folder / "export.json", lines)
    out = world_tmp / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    counts = as_unprivileged(lambda: ingest(export_source(export), out).class_counts)
    assert counts == {"a": 3, "c": 2}
    assert skipped(out) == {
        "pics/x/img_0003.jpg": "unreadable",
        **{f"pics/y/img_000{i}.jpg": "unreadable" for i in range(3)},
    }


def test_a_fifo_in_the_tree_is_reported_never_opened(tmp_path):
    # Opening a FIFO blocks until something writes to it: ingest and the fingerprint must not.
    src = make_class_tree(tmp_path / "src", {"cats": 3, "dogs": 3})
    os.mkfifo(src / "cats" / "pipe.jpg")
    os.mkfifo(src / "pipe-beside.jpg")
    before = fingerprint_source(tree_source(src))
    out = tmp_path / "out"
    result = ingest(tree_source(src), out)
    assert result.class_counts == {"cats": 3, "dogs": 3}
    assert skipped(out) == {"cats/pipe.jpg": "special_file", "pipe-beside.jpg": "special_file"}
    assert read_metrics(out / "metrics" / "ingest.json")["items"] == 8
    assert before["files"] == 6  # not data: the fingerprint leaves them out, as links
    # An export naming a FIFO: the same row, not a missing file, and never opened.
    lines = [item(f"src/{c}/img_000{i}.jpg", [c]) for c in ("cats", "dogs") for i in range(3)]
    # A folder is not one either (it was called "a FIFO, socket or device").
    lines += [item("src/cats/pipe.jpg", ["cats"]), item("src/dogs", ["dogs"])]
    export = write_export(tmp_path / "export.json", lines)
    ingest(export_source(export), tmp_path / "out2")
    assert skipped(tmp_path / "out2") == {
        "src/cats/pipe.jpg": "special_file",
        "src/dogs": "missing_file",
    }
    rows = read_csv(tmp_path / "out2" / "metrics" / "ingest_skipped.csv")
    assert rows[1]["detail"] == (
        f"line 8: {src / 'dogs'} is a folder; an item names one image file"
    )
