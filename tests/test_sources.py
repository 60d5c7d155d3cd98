"""resolve_source / fingerprint_source and the `source` stage, on real files and real HTTP."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from imgclf.archives import ArchiveLimits
from imgclf.config import cache_dir
from imgclf.fileio import sha256_file
from imgclf.sources import (
    COMPLETE_MARKER,
    DEFAULT_SOURCE,
    ResolvedSource,
    SourceUnavailable,
    fingerprint_source,
    resolve_source,
)
from tests.helpers import NOBODY, as_unprivileged, make_class_tree
from tests.http_server import LoopbackServer, closed_port_url

ROOT = Path(__file__).resolve().parents[1]
EXPORT_LINE = {
    "content": "http://example.invalid/a.jpg",
    "annotation": {"labels": ["daisy"], "note": ""},
    "extras": None,
    "metadata": {"status": "done"},
}


@pytest.fixture(autouse=True)
def _no_real_keras_cache(tmp_path, monkeypatch):
    """Tests never see the machine's own ~/.keras."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERAS_HOME", raising=False)


@pytest.fixture
def flowers(tmp_path) -> Path:
    root = make_class_tree(tmp_path / "data" / "flower_photos", {"daisy": 3, "roses": 2})
    (root / "LICENSE.txt").write_text("CC-BY 2.0\n")
    return root


def _tgz(path: Path, tree: Path, arcname: str = "flower_photos") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname=arcname)
    return path


def _zip(path: Path, tree: Path, arcname: str = "flower_photos") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(tree.rglob("*")):
            zf.write(p, f"{arcname}/{p.relative_to(tree).as_posix()}")
        zf.writestr("__MACOSX/flower_photos/._LICENSE.txt", b"resource fork")
    return path


def _export(path: Path, n: int = 3) -> Path:
    path.write_text("\n" + "\n".join(json.dumps(EXPORT_LINE) for _ in range(n)) + "\n")
    return path


# -- trees ----------------------------------------------------------------------------------
def test_tree_absolute_relative_home_and_file_url(tmp_path, flowers, monkeypatch):
    r = resolve_source(str(flowers))
    assert (r.kind, r.path, r.source) == ("tree", flowers, str(flowers))
    assert resolve_source("data/flower_photos", base_dir=tmp_path).path == flowers
    monkeypatch.chdir(tmp_path)
    assert resolve_source("data/flower_photos").path == flowers
    assert resolve_source(flowers.as_uri()).path == flowers
    home = Path(os.environ["HOME"])
    shutil.copytree(flowers, home / "pics" / "flower_photos")
    assert resolve_source("~/pics/flower_photos").path == home / "pics" / "flower_photos"


def test_single_wrapper_dir_is_unwrapped(tmp_path, flowers):
    # data/ holds only flower_photos/ (plus hidden litter): resolve to flower_photos/.
    (tmp_path / "data" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "data" / "__MACOSX").mkdir()
    r = resolve_source(str(tmp_path / "data"))
    assert r.path == flowers and "inside flower_photos/" in r.origin


def test_single_class_folder_is_not_unwrapped(tmp_path):
    root = make_class_tree(tmp_path / "one", {"daisy": 2})
    assert resolve_source(str(root)).path == root


def test_missing_path_and_folder_without_classes(tmp_path):
    with pytest.raises(SourceUnavailable) as e:
        resolve_source("no/such/flowers", base_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "no/such/flowers") in msg and "does not exist" in msg
    assert "<class>/<image files>" in msg and "make run DATA=" in msg

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "1.jpg").write_bytes(b"x")
    with pytest.raises(SourceUnavailable, match="holds no class folders"):
        resolve_source(str(flat))
    with pytest.raises(SourceUnavailable, match=r"data\.source is empty"):
        resolve_source("  ")


# -- archives -------------------------------------------------------------------------------
def test_local_tgz_is_extracted_once(tmp_path, flowers):
    archive = _tgz(tmp_path / "in" / "flowers.tgz", flowers)
    before = sha256_file(archive)
    r = resolve_source(str(archive))
    target = cache_dir("extracted") / before
    assert r.kind == "tree" and r.path == target / "flower_photos"
    assert (target / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in r.path.iterdir()) == ["LICENSE.txt", "daisy", "roses"]
    inode = (target / "flower_photos" / "daisy").stat().st_ino
    assert resolve_source(str(archive)).path == r.path
    assert (target / "flower_photos" / "daisy").stat().st_ino == inode  # not re-extracted
    assert sha256_file(archive) == before
    assert [p.name for p in archive.parent.iterdir()] == ["flowers.tgz"]


def test_extraction_without_marker_is_redone(tmp_path, flowers):
    archive = _tgz(tmp_path / "flowers.tgz", flowers)
    target = cache_dir("extracted") / sha256_file(archive)
    (target / "flower_photos" / "daisy").mkdir(parents=True)  # a killed run's leftover
    r = resolve_source(str(archive))
    assert len(list((r.path / "daisy").iterdir())) == 3


def test_archives_served_over_http(tmp_path, flowers):
    files = {
        "dl/flowers.tgz": _tgz(tmp_path / "flowers.tgz", flowers).read_bytes(),
        "dl/flowers.zip": _zip(tmp_path / "flowers.zip", flowers).read_bytes(),
        "dl/export.json": _export(tmp_path / "export.json").read_bytes(),
    }
    # Apache's old `AddEncoding x-gzip .tgz` sends a .tgz as a gzip-encoded tar: stored
    # decoded, the plain tar extracts to the same tree.
    files["apache/flowers.tgz"] = files["dl/flowers.tgz"]
    headers = {"apache/flowers.tgz": {"Content-Encoding": "x-gzip"}}
    with LoopbackServer(files, headers=headers) as srv:
        tgz = resolve_source(srv.url("dl/flowers.tgz"), timeout_s=5)
        apache = resolve_source(srv.url("apache/flowers.tgz"), timeout_s=5)
        assert apache.kind == "tree" and fingerprint_source(apache) == fingerprint_source(tgz)
        zipped = resolve_source(srv.url("dl/flowers.zip"), timeout_s=5)
        export = resolve_source(srv.url("dl/export.json"), timeout_s=5)
        assert tgz.kind == zipped.kind == "tree" and export.kind == "dataturks"
        assert tgz.origin.startswith(srv.url("dl/flowers.tgz"))
        assert fingerprint_source(tgz) == fingerprint_source(zipped)
        assert export.path.read_bytes() == files["dl/export.json"]
        srv.reset_counts()
        for name in files:  # a re-run downloads (and extracts) nothing
            assert resolve_source(srv.url(name)).path.exists()
        assert srv.total == 0


def test_a_web_page_instead_of_the_file_is_named_and_not_kept(tmp_path, flowers):
    # A sharing link answers 200 with a sign-in page; once the link is fixed, the same URL
    # gives the archive, and the next run must fetch it instead of reusing the page.
    page = b"\n<!DOCTYPE html><html><head><title>Sign in -\n Accounts</title></head></html>"
    with LoopbackServer({"dl/flowers.tgz": page}) as srv:
        url, port = srv.url("dl/flowers.tgz"), srv.port
        with pytest.raises(SourceUnavailable) as e:
            resolve_source(url, timeout_s=5)
    message = str(e.value)
    assert "is neither a folder, an archive nor a Dataturks export" in message
    assert "answered with a web page (titled 'Sign in - Accounts'), not the file" in message
    assert message.endswith("The download was not kept: the next run fetches the URL again.")
    tgz = _tgz(tmp_path / "flowers.tgz", flowers).read_bytes()
    with LoopbackServer({"dl/flowers.tgz": tgz}, port=port) as srv:
        assert resolve_source(url, timeout_s=5).kind == "tree"
        assert srv.count("dl/flowers.tgz") == 1


def test_http_404_is_one_paragraph(tmp_path):
    with LoopbackServer({}) as srv, pytest.raises(SourceUnavailable) as e:
        resolve_source(srv.url("gone/flowers.tgz"), timeout_s=5)
    msg = str(e.value)
    assert "HTTP 404" in msg and "check the URL" in msg and "\n" not in msg


def test_a_source_this_user_cannot_read_is_one_clear_error(world_tmp, flowers):
    root = world_tmp / "flowers"
    shutil.copytree(flowers, root)
    export = _export(world_tmp / "export.json")
    root.chmod(0o700)
    export.chmod(0o600)

    def errors() -> list[str]:
        out = []
        for path in (root, export):
            try:
                resolve_source(str(path))
            except SourceUnavailable as e:
                out.append(str(e))
        return out

    folder, file = as_unprivileged(errors)
    user = pwd.getpwuid(NOBODY if os.geteuid() == 0 else os.geteuid()).pw_name
    assert f"the folder cannot be listed by this user ({user}): {root}." in folder
    assert f"the file cannot be read by this user ({user}): {export}." in file
    assert "Fix its permissions" in file and "\n" not in folder + file


def test_a_fifo_or_device_as_the_source_is_refused_unread(tmp_path):
    fifo = tmp_path / "flowers.tgz"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    for path in (fifo, Path("/dev/null")):
        with pytest.raises(SourceUnavailable, match="is a FIFO, socket or device"):
            resolve_source(str(path))


def test_a_download_over_the_extraction_cap_is_refused(tmp_path, flowers):
    # A source URL that names a video, or a server that never stops: cut off at
    # ingest.max_extracted_bytes (what the archive could write anyway), nothing kept.
    tgz = _tgz(tmp_path / "flowers.tgz", flowers).read_bytes()
    limits = ArchiveLimits(max_bytes=len(tgz) - 1)
    with LoopbackServer({"big/flowers.tgz": tgz}, endless=["live/flowers.tgz"]) as srv:
        for path, found in [
            ("big/flowers.tgz", f"Content-Length {len(tgz):,}"),
            ("live/flowers.tgz", "the body went on, cut off"),
        ]:
            with pytest.raises(SourceUnavailable) as e:
                resolve_source(srv.url(path), timeout_s=5, limits=limits)
            msg = str(e.value)
            assert f"{found}: over the limit of {len(tgz) - 1:,} bytes" in msg, msg
            assert "dvc exp run -S ingest.max_extracted_bytes=N" in msg and "\n" not in msg
            assert srv.count(path) == 1  # not retried
        assert not any(cache_dir("downloads").iterdir())


# -- Dataturks exports ----------------------------------------------------------------------
def test_dataturks_export_is_detected_by_content(tmp_path):
    for name in ("export.json", "export.jsonl", "export.txt", "no_extension"):
        r = resolve_source(str(_export(tmp_path / name)))
        assert (r.kind, r.path) == ("dataturks", tmp_path / name)
    wrong = tmp_path / "other.json"
    wrong.write_text('{"url": "http://x/a.jpg"}\n')
    with pytest.raises(SourceUnavailable, match='"content" key'):
        resolve_source(str(wrong))
    array = tmp_path / "array.json"
    array.write_text(json.dumps([EXPORT_LINE]))
    with pytest.raises(SourceUnavailable, match="JSON array"):
        resolve_source(str(array))
    # UTF-16 with a BOM (Windows PowerShell's `>`) is an export; so is one whose first line
    # is not UTF-8 but an export's line otherwise (ingest skips that line as a bad line).
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(_export(tmp_path / "plain.json").read_text().encode("utf-16"))
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps({**EXPORT_LINE, "content": "café.jpg"}, ensure_ascii=False)
                       .encode("latin-1"))  # fmt: skip
    for export in (utf16, latin1):
        assert resolve_source(str(export)).kind == "dataturks"
    not_text = tmp_path / "photo.json"
    not_text.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00")
    with pytest.raises(SourceUnavailable, match=r"first line is not UTF-8 text \(byte 0x89 at "):
        resolve_source(str(not_text))
    empty = tmp_path / "empty.json"
    empty.touch()
    with pytest.raises(SourceUnavailable, match=r"empty\.json is an empty file \(0 bytes\)"):
        resolve_source(str(empty))
    # A first line nested deeper than Python's JSON reader follows is not an export either.
    deep = tmp_path / "deep.json"
    deep.write_text('{"content": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(SourceUnavailable, match='"content" key'):
        resolve_source(str(deep))


def test_real_dataturks_exports(shared_datasets):
    export = shared_datasets / "dataturks" / "gaa_county_classification.json"
    r = resolve_source(str(export))
    assert r.kind == "dataturks"
    fp = fingerprint_source(r)
    assert fp == {"sha256": sha256_file(export), "files": 1, "bytes": export.stat().st_size}


# -- Keras' cache ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout",
    [
        "flower_photos.tgz",  # keras get_file("flower_photos.tgz", url)
        "flower_photos/flower_photos",  # keras 3 get_file("flower_photos", url, untar=True)
        "flower_photos_extracted/flower_photos",  # keras 3 extract=True with an fname
        "flower_photos",  # keras 2 untar=True
    ],
)
def test_keras_cache_is_reused_for_the_default_url(tmp_path, flowers, monkeypatch, layout):
    datasets = tmp_path / "keras_home" / "datasets"
    monkeypatch.setenv("KERAS_HOME", str(datasets.parent))
    if layout.endswith(".tgz"):
        _tgz(datasets / layout, flowers)
    else:
        shutil.copytree(flowers, datasets / layout)
    start = time.monotonic()
    r = resolve_source(DEFAULT_SOURCE, timeout_s=2)  # offline here: only the cache can answer
    assert time.monotonic() - start < 5
    assert r.kind == "tree" and r.source == DEFAULT_SOURCE and "Keras cache" in r.origin
    assert fingerprint_source(r) == fingerprint_source(resolve_source(str(flowers)))


def test_keras_cache_under_home_and_for_any_flower_photos_url(flowers):
    datasets = Path(os.environ["HOME"]) / ".keras" / "datasets"
    shutil.copytree(flowers, datasets / "flower_photos")
    with LoopbackServer({}) as srv:
        r = resolve_source(srv.url("mirror/flower_photos.tgz"))
        assert r.path == datasets / "flower_photos" and srv.total == 0


# -- offline --------------------------------------------------------------------------------
def _offline_paragraph_checks(msg: str, url: str) -> None:
    assert "\n" not in msg
    assert f"Could not download {url}" in msg
    assert "make run DATA=/path/to/flower_photos" in msg
    assert "dvc exp run -S data.source=/path/to/flower_photos" in msg
    assert "Dataturks image-classification export" in msg
    assert "~/.keras/datasets/ is picked up automatically" in msg


def test_connection_refused_gives_the_offline_paragraph():
    url = closed_port_url("flower_photos.tgz")
    with pytest.raises(SourceUnavailable) as e:
        resolve_source(url, timeout_s=2, retries=0)
    _offline_paragraph_checks(str(e.value), url)
    assert "connection refused" in str(e.value)


def _online() -> bool:
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_online(), reason="network reachable: would download 218 MB")
def test_default_url_offline_fails_fast_with_the_paragraph():
    start = time.monotonic()
    with pytest.raises(SourceUnavailable) as e:
        resolve_source(DEFAULT_SOURCE, timeout_s=5)
    assert time.monotonic() - start < 10
    _offline_paragraph_checks(str(e.value), DEFAULT_SOURCE)


# -- fingerprints ---------------------------------------------------------------------------
def test_fingerprint_is_stable_and_path_independent(tmp_path, flowers):
    fp = fingerprint_source(resolve_source(str(flowers)))
    assert fp == fingerprint_source(resolve_source(str(flowers)))
    assert fp["files"] == 6 and fp["bytes"] == sum(
        p.stat().st_size for p in flowers.rglob("*") if p.is_file()
    )
    elsewhere = shutil.copytree(flowers, tmp_path / "elsewhere" / "renamed_root")
    (elsewhere / ".DS_Store").write_bytes(b"litter")
    assert fingerprint_source(resolve_source(str(elsewhere))) == fp
    # The same content described by hand, with a different `source`/`origin`: same result.
    assert fingerprint_source(ResolvedSource("x", "tree", elsewhere, "y")) == fp

    one = elsewhere / "daisy" / "img_0000.jpg"
    one.write_bytes(one.read_bytes()[:-1] + b"\x00")
    changed = fingerprint_source(resolve_source(str(elsewhere)))
    assert changed["sha256"] != fp["sha256"] and changed["files"] == 6
    one.rename(elsewhere / "roses" / "img_0000.jpg")  # same bytes, other class
    moved = fingerprint_source(resolve_source(str(elsewhere)))
    assert moved["sha256"] not in (fp["sha256"], changed["sha256"])


@pytest.mark.parametrize("url", ["ftp://example.org/flowers.tgz", "s3://bucket/flowers.tgz"])
def test_a_url_scheme_the_stage_cannot_fetch_is_named(url):
    # It used to read as a relative path: "points to <repo>/ftp:/example.org/... which does
    # not exist".
    with pytest.raises(SourceUnavailable, match=r":// URL, which the source stage cannot fetch"):
        resolve_source(url)


def test_an_exports_fingerprint_holds_its_local_images_content(tmp_path):
    # It used to hash the export's bytes only: an image added, replaced or removed beside an
    # unchanged export left `dvc repro` skipping ingest, with the old (or missing) image.
    folder = tmp_path / "a"
    images = make_class_tree(folder / "images", {"daisy": 2})
    lines = [json.dumps({"content": f"images/daisy/img_{i:04d}.jpg",
                         "annotation": {"labels": ["daisy"]}}) for i in range(3)]  # fmt: skip
    (folder / "export.json").write_text("\n".join(lines) + "\n")
    fp = fingerprint_source(resolve_source(str(folder / "export.json")))
    assert fp["files"] == 3  # the export and the two images that exist
    elsewhere = shutil.copytree(folder, tmp_path / "b")
    assert fingerprint_source(resolve_source(str(elsewhere / "export.json"))) == fp
    make_class_tree(images, {"daisy": 3})  # the third image appears
    added = fingerprint_source(resolve_source(str(folder / "export.json")))
    assert added["files"] == 4 and added["sha256"] != fp["sha256"]
    first = images / "daisy" / "img_0000.jpg"
    first.write_bytes(first.read_bytes()[:-1] + b"\x00")
    assert fingerprint_source(resolve_source(str(folder / "export.json")))["sha256"] not in (
        fp["sha256"], added["sha256"]
    )  # fmt: skip


def test_real_flower_photos_resolve_as_a_tree(shared_datasets):
    root = shared_datasets / "flower_photos"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    r = resolve_source(str(root))
    assert r.kind == "tree" and r.path == root
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    start = time.monotonic()
    fp = fingerprint_source(r)
    elapsed = time.monotonic() - start
    images = sum(1 for p in root.rglob("*.jpg"))
    assert fp["files"] == images + 1  # + LICENSE.txt
    assert elapsed < 5, f"fingerprinting took {elapsed:.1f} s"


# -- the stage ------------------------------------------------------------------------------
def _run_stage(repo: Path, source: str, env_extra: dict | None = None):
    repo.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["source"] = source
    (repo / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "stages.source"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_stage_output_is_byte_identical_across_machines(tmp_path, flowers):
    outputs = []
    for machine in ("machine_a", "machine_b"):
        repo = tmp_path / machine / "repo"
        shutil.copytree(flowers, repo / "input" / "flower_photos")
        done = _run_stage(repo, "input/flower_photos")
        assert done.returncode == 0, done.stderr
        text = (repo / "data" / "source.json").read_text()
        assert machine not in text and str(tmp_path) not in text
        outputs.append(text)
    assert outputs[0] == outputs[1]
    info = json.loads(outputs[0])
    assert info["source"] == "input/flower_photos" and info["kind"] == "tree"
    assert set(info["fingerprint"]) == {"sha256", "files", "bytes"}


def test_stage_offline_prints_the_paragraph_without_traceback(tmp_path):
    url = closed_port_url("flower_photos.tgz")
    done = _run_stage(tmp_path / "repo", url, {"KERAS_HOME": str(tmp_path / "nokeras")})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "make run DATA=/path/to/flower_photos" in done.stderr
    assert not (tmp_path / "repo" / "data" / "source.json").exists()


def test_every_source_kind_is_fingerprinted_and_read():
    from imgclf.ingest.collect import COLLECTORS
    from imgclf.sources import FINGERPRINTS, ResolvedSource

    assert list(COLLECTORS) == list(FINGERPRINTS) == ["tree", "dataturks"]
    with pytest.raises(ValueError, match="unknown source kind 'csv': one of tree, dataturks"):
        ResolvedSource("x.csv", "csv", Path("x.csv"), "x.csv")
