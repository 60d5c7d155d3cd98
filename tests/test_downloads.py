"""download_many / download_file against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgclf import downloads
from imgclf.downloads import DownloadError, cached_path, download_file, download_many
from tests.http_server import LoopbackServer, closed_port_url

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    # Real retries, just without half-second waits between them.
    monkeypatch.setattr(downloads, "BACKOFF_S", 0.01)


def _files(n: int, size: int = 300) -> dict[str, bytes]:
    return {f"img/{i:03d}.jpg": bytes([i % 251]) * size + f"#{i}".encode() for i in range(n)}


def test_many_small_files_concurrently(tmp_path):
    files = _files(40)
    cache = tmp_path / "cache"
    # Every request takes 0.2 s: 40 of them one after the other would take 8 s.
    with LoopbackServer(files, delays={k: 0.2 for k in files}) as srv:
        urls = [srv.url(k) for k in files]
        start = time.monotonic()
        results = download_many(urls, workers=8, timeout_s=5, cache=cache)
        elapsed = time.monotonic() - start
        assert list(results) == urls  # input order
        for key, url in zip(files, urls, strict=True):
            r = results[url]
            assert r.error is None and r.ok
            assert r.path == cached_path(url, cache)
            assert r.path.read_bytes() == files[key]
            assert srv.count(key) == 1
    assert elapsed < 4, f"{elapsed:.1f} s: downloads do not overlap"
    # Nothing but whole files in the cache.
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        cached_path(u, cache).name for u in urls
    )


def test_rerun_downloads_nothing(tmp_path):
    files = _files(10)
    with LoopbackServer(files) as srv:
        urls = [srv.url(k) for k in files] + [srv.url("missing.jpg")]
        first = download_many(urls, cache=tmp_path)
        assert srv.total == 11
        srv.reset_counts()
        second = download_many(urls, cache=tmp_path)
        # Successes come from the cache; only the failure is asked again (it may come back).
        assert srv.total == 1 and srv.count("missing.jpg") == 1
        assert {u: r.path for u, r in first.items()} == {u: r.path for u, r in second.items()}


def test_404_is_counted_not_raised_nor_retried(tmp_path):
    files = _files(3)
    with LoopbackServer(files, statuses={"gone.jpg": 404, "forbidden.jpg": 403}) as srv:
        urls = [srv.url(k) for k in files] + [srv.url("gone.jpg"), srv.url("forbidden.jpg")]
        results = download_many(urls, retries=3, cache=tmp_path)
        assert results[srv.url("gone.jpg")].error == "HTTP 404"
        assert results[srv.url("gone.jpg")].path is None
        assert results[srv.url("forbidden.jpg")].error == "HTTP 403"
        assert srv.count("gone.jpg") == 1 and srv.count("forbidden.jpg") == 1
        assert sum(r.ok for r in results.values()) == 3
    assert not cached_path(srv.url("gone.jpg"), tmp_path).exists()


def test_server_errors_and_429_are_retried(tmp_path):
    statuses = {"flaky.jpg": [503, 503, 200], "busy.jpg": [429, 200], "broken.jpg": 500}
    files = {"flaky.jpg": b"flaky", "busy.jpg": b"busy", "broken.jpg": b"never"}
    with LoopbackServer(files, statuses=statuses) as srv:
        results = download_many([srv.url(k) for k in files], retries=2, cache=tmp_path)
        assert results[srv.url("flaky.jpg")].path.read_bytes() == b"flaky"
        assert srv.count("flaky.jpg") == 3
        assert results[srv.url("busy.jpg")].ok and srv.count("busy.jpg") == 2
        assert results[srv.url("broken.jpg")].error == "HTTP 500 (3 attempts)"
        assert srv.count("broken.jpg") == 3


def test_slow_url_times_out_then_is_retried(tmp_path):
    files = {"fast.jpg": b"fast", "slow.jpg": b"slow", "slow_once.jpg": b"late"}
    delays = {"slow.jpg": 3.0, "slow_once.jpg": [3.0, 0.0]}
    with LoopbackServer(files, delays=delays) as srv:
        start = time.monotonic()
        results = download_many(
            [srv.url(k) for k in files], timeout_s=0.3, retries=1, cache=tmp_path
        )
        elapsed = time.monotonic() - start
        assert results[srv.url("slow.jpg")].error == "timed out after 0.3 s (2 attempts)"
        assert srv.count("slow.jpg") == 2
        assert results[srv.url("slow_once.jpg")].path.read_bytes() == b"late"
        assert srv.count("slow_once.jpg") == 2
        assert results[srv.url("fast.jpg")].ok
    assert elapsed < 2.5


def test_truncated_body_is_never_cached(tmp_path):
    with LoopbackServer({"cut.jpg": b"x" * 1000}, truncate={"cut.jpg": 100}) as srv:
        url = srv.url("cut.jpg")
        result = download_many([url], retries=1, cache=tmp_path)[url]
        assert result.error == "incomplete download: 100 of 1000 bytes (2 attempts)"
        assert srv.count("cut.jpg") == 2
    assert list(tmp_path.iterdir()) == []


def test_a_body_over_the_limit_is_cut_off_once_and_never_cached(tmp_path):
    # A video under an image's URL (its Content-Length says so: nothing is read), and a server
    # that never stops sending (no Content-Length: cut off at the limit, not retried).
    limit = downloads.ByteLimit(200_000, "the test's limit")
    files = {"ok.jpg": b"x" * 1000, "video.jpg": b"v" * 300_000}
    with LoopbackServer(files, endless=["stream.jpg"]) as srv:
        urls = [srv.url(n) for n in ("ok.jpg", "video.jpg", "stream.jpg")]
        results = download_many(urls, retries=2, cache=tmp_path, limit=limit)
        assert results[urls[0]].ok
        assert results[urls[1]].error == (
            "Content-Length 300,000: over the limit of 200,000 bytes (the test's limit); "
            "nothing kept"
        )
        assert results[urls[2]].error == (
            "the body went on, cut off: over the limit of 200,000 bytes (the test's limit); "
            "nothing kept"
        )
        assert srv.count("video.jpg") == srv.count("stream.jpg") == 1
        # Stopped near the limit (the socket's buffers hold a few chunks more), not at the end.
        assert srv.endless_sent["/stream.jpg"] < 200_000 + 8 * 2**20
    assert [p.name for p in tmp_path.iterdir()] == [cached_path(urls[0], tmp_path).name]


def test_a_body_sent_with_a_content_encoding_is_stored_decoded(tmp_path):
    # A server may compress any answer (urllib3 sends no Accept-Encoding), and an S3 object
    # uploaded with Content-Encoding: gzip is always sent so: the file is the decoded body.
    # The limit counts what is written (a gzip bomb is cut off), Content-Length the wire.
    data = bytes(range(256)) * 400
    files = {
        "photo.jpg": gzip.compress(data),
        "bomb.jpg": gzip.compress(bytes(2_000_000)),
        "not_gzip.jpg": b"plain bytes, whatever the header says",
        "cut.jpg": gzip.compress(data),
    }
    limit = downloads.ByteLimit(200_000, "the test's limit")
    headers = {name: {"Content-Encoding": "gzip"} for name in files}
    with LoopbackServer(files, headers=headers, truncate={"cut.jpg": 100}) as srv:
        urls = {name: srv.url(name) for name in files}
        results = download_many(list(urls.values()), retries=1, cache=tmp_path, limit=limit)
        assert results[urls["photo.jpg"]].path.read_bytes() == data
        assert results[urls["bomb.jpg"]].error == (
            "the body went on, cut off: over the limit of 200,000 bytes (the test's limit); "
            "nothing kept"
        )
        error = results[urls["not_gzip.jpg"]].error
        assert error.startswith("the body is not the Content-Encoding 'gzip' it was sent as ("), (
            error
        )
        assert error.endswith("); nothing kept")
        assert srv.count("bomb.jpg") == srv.count("not_gzip.jpg") == 1
        assert results[urls["cut.jpg"]].error == (
            f"incomplete download: 100 of {len(files['cut.jpg'])} bytes (2 attempts)"
        )
    assert [p.name for p in tmp_path.iterdir()] == [cached_path(urls["photo.jpg"], tmp_path).name]


def test_partial_tmp_left_by_a_killed_run_is_no_hit_and_is_cleaned(tmp_path):
    data = b"whole file" * 100
    with LoopbackServer({"a.jpg": data}) as srv:
        url = srv.url("a.jpg")
        final = cached_path(url, tmp_path)
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        stale = tmp_path / f".{final.name}.{dead.stdout.strip()}.abc123.tmp"
        stale.write_bytes(data[:17])
        foreign = tmp_path / (final.name + ".tmp")  # not even our naming scheme
        foreign.write_bytes(data[:5])
        result = download_many([url], cache=tmp_path)[url]
        assert result.path == final and final.read_bytes() == data
        assert srv.count("a.jpg") == 1
    assert not stale.exists() and not foreign.exists()


def test_kill_9_mid_download_leaves_no_cache_entry(tmp_path):
    data = os.urandom(256 * 1024)
    cache = tmp_path / "cache"
    with LoopbackServer({"big.tgz": data}, stall={"big.tgz": 100_000}) as srv:
        url = srv.url("big.tgz")
        code = (
            "import sys; from pathlib import Path; from imgclf.downloads import download_file;"
            "download_file(sys.argv[1], timeout_s=60, cache=Path(sys.argv[2]))"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, url, str(cache)],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            # Wait until the child holds a partly written temporary file, then kill it.
            while not any(p.stat().st_size >= 90_000 for p in cache.glob(".*.tmp")):
                assert time.monotonic() < deadline, "the child never started writing"
                assert proc.poll() is None
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        final = cached_path(url, cache)
        assert not final.exists()
        assert len(list(cache.glob(".*.tmp"))) == 1  # the corpse

    # A fresh run (server answering normally now) ignores and removes the partial file.
    with LoopbackServer({"big.tgz": data}, port=srv.port) as srv2:
        assert srv2.url("big.tgz") == url
        path = download_file(url, cache=cache)
        assert path == final and path.read_bytes() == data and srv2.count("big.tgz") == 1
    assert list(cache.glob(".*.tmp")) == []


def test_unreachable_host_is_reported_quickly(tmp_path):
    base = closed_port_url("")
    urls = [f"{base}{i}.jpg" for i in range(6)]
    start = time.monotonic()
    results = download_many(urls, workers=1, retries=1, cache=tmp_path)
    assert time.monotonic() - start < 5
    errors = [results[u].error for u in urls]
    assert all(e == "connection refused by 127.0.0.1 (2 attempts)" for e in errors), errors


def test_retry_after_is_obeyed(tmp_path):
    # 503 with Retry-After: 1, then 200: the second request comes about a second later.
    files = {"later.jpg": b"later"}
    with LoopbackServer(
        files, statuses={"later.jpg": [503, 200]}, headers={"later.jpg": {"Retry-After": "1"}}
    ) as srv:
        start = time.monotonic()
        result = download_many([srv.url("later.jpg")], retries=1, cache=tmp_path)
        elapsed = time.monotonic() - start
        assert result[srv.url("later.jpg")].ok and srv.count("later.jpg") == 2
    assert 0.9 <= elapsed < 3


def test_redirects_are_followed_even_without_retries(tmp_path):
    with LoopbackServer(
        {"new.jpg": b"moved"},
        statuses={"old.jpg": 302},
        headers={"old.jpg": {"Location": "/new.jpg"}},
    ) as srv:
        result = download_many([srv.url("old.jpg")], retries=0, cache=tmp_path)
        r = result[srv.url("old.jpg")]
        assert r.ok and r.path.read_bytes() == b"moved"


def test_local_files_and_bad_schemes(tmp_path):
    here = tmp_path / "a b.jpg"
    here.write_bytes(b"local")
    urls = [here.as_uri(), str(here), str(tmp_path / "nope.jpg"), "ftp://example.org/x.jpg"]
    results = download_many(urls, cache=tmp_path / "cache")
    assert results[urls[0]].path == here and results[urls[1]].path == here
    assert results[urls[2]].error == "no such file"
    assert results[urls[3]].error.startswith("unsupported URL scheme 'ftp'")
    assert not any((tmp_path / "cache").iterdir())  # nothing copied


def test_duplicates_are_fetched_once(tmp_path):
    with LoopbackServer({"a.jpg": b"a"}) as srv:
        url = srv.url("a.jpg")
        results = download_many([url, url, url], cache=tmp_path)
        assert list(results) == [url] and srv.count("a.jpg") == 1


def test_download_file_caches_and_raises_clear_errors(tmp_path):
    data = os.urandom(200_000)
    with LoopbackServer({"data/archive.tar.gz": data}, statuses={"gone.tgz": 404}) as srv:
        url = srv.url("data/archive.tar.gz")
        path = download_file(url, cache=tmp_path)
        assert path.name.endswith(".tar.gz") and path.read_bytes() == data
        assert download_file(url, cache=tmp_path) == path
        assert srv.count("data/archive.tar.gz") == 1

        with pytest.raises(DownloadError, match=r"could not download .*gone\.tgz: HTTP 404$") as e:
            download_file(srv.url("gone.tgz"), cache=tmp_path)
        assert e.value.network is False and srv.count("gone.tgz") == 1

    with pytest.raises(DownloadError, match=r"DNS lookup failed for host\.invalid") as e:
        download_file("http://host.invalid/flower_photos.tgz", cache=tmp_path, timeout_s=5)
    assert e.value.network is True
    with pytest.raises(DownloadError, match="connection refused") as e:
        download_file(closed_port_url("x.tgz"), retries=0, cache=tmp_path)
    assert e.value.network is True
