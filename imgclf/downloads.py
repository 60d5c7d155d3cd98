"""Downloads over HTTP(S) into a persistent, kill-safe cache.

Every URL maps to one cache file named after the sha256 of the URL, so a re-run (or
another experiment in a copy of the repo) downloads nothing it already has. Bytes go to a
temporary file first and are renamed into place only once complete: a cache file is
always a whole download, even after kill -9 or a dropped connection.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from imgclf.config import cache_dir

USER_AGENT = "tf-or-keras-imgclf/0.1 (Python urllib)"
# First retry waits about BACKOFF_S, then doubles (with jitter), capped at BACKOFF_MAX_S.
BACKOFF_S = 0.5
BACKOFF_MAX_S = 8.0
# After this many URLs of one host failed at the network level (and none succeeded), the
# rest of that host's URLs fail at once instead of each waiting out its own timeouts.
HOST_FAILURE_LIMIT = 3

_CHUNK = 1 << 16
_HTTP_SCHEMES = ("http", "https")
_RETRIABLE_STATUS = (408, 429)
# Our temporary files: ".<final name>.<pid>.<random>.tmp" (see _clean_stale_tmp).
_TMP_RE = re.compile(r"^\..*\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


class DownloadError(RuntimeError):
    """A download failed for good. `network` is True when the host could not be reached
    at all (DNS failure, connection refused, timeout): the machine may be offline."""

    def __init__(self, url: str, reason: str, *, network: bool = False) -> None:
        self.url = url
        self.reason = reason
        self.network = network
        super().__init__(f"could not download {url}: {reason}")


@dataclass(frozen=True)
class DownloadResult:
    url: str
    path: Path | None  # the cached (or local) file; None on failure
    error: str | None  # one line, e.g. "HTTP 404", "timed out after 20 s (3 attempts)"

    @property
    def ok(self) -> bool:
        return self.path is not None


class _Failure(Exception):
    def __init__(
        self,
        reason: str,
        *,
        retriable: bool,
        network: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = " ".join(reason.split())  # always one line
        self.retriable = retriable
        self.network = network
        self.retry_after = retry_after
        self.attempts = 1

    @property
    def message(self) -> str:
        return self.reason + (f" ({self.attempts} attempts)" if self.attempts > 1 else "")


# -- cache layout ---------------------------------------------------------------------------
def _suffix(url: str) -> str:
    """Keep the URL's extension on the cache file: archives are recognisable by name."""
    name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1].lower()
    for ext in (".tar.gz", ".tar.bz2", ".tar.xz"):
        if name.endswith(ext):
            return ext
    ext = os.path.splitext(name)[1]
    return ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ""


def url_file_name(url: str) -> str:
    """The last component of the URL's path, percent-decoded ("" when there is none)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])


def cached_path(url: str, cache: Path | None = None) -> Path:
    """Where `url` is (or would be) cached: `<cache>/<sha256 of the URL><extension>`."""
    cache = Path(cache) if cache is not None else cache_dir("downloads")
    return cache / (hashlib.sha256(url.encode("utf-8")).hexdigest() + _suffix(url))


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (the owner of a temporary file or folder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clean_stale_tmp(cache: Path) -> None:
    """Remove temporary files left by killed downloads (never those of a live process:
    parallel `dvc exp` runs share the cache). A directory scan: milliseconds."""
    try:
        entries = list(os.scandir(cache))
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.endswith(".tmp") or not entry.is_file(follow_symlinks=False):
            continue
        m = _TMP_RE.match(entry.name)
        if m is None or not pid_alive(int(m.group(1))):
            Path(entry.path).unlink(missing_ok=True)


def _ready_cache(cache: Path | None) -> Path:
    """The cache folder (default cache_dir("downloads")), created, stale temporaries removed."""
    cache = Path(cache) if cache is not None else cache_dir("downloads")
    cache.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(cache)
    return cache


def _local_path(url: str) -> Path | None:
    """The file a file:// URL (or a plain path) names; None for http(s)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return Path(urllib.request.url2pathname(parts.path)).expanduser()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # "C:\..." on Windows
        return Path(url).expanduser()
    return None


def _check_scheme(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _HTTP_SCHEMES:
        raise _Failure(f"unsupported URL scheme {scheme!r} (http, https or file)", retriable=False)


# -- one attempt ----------------------------------------------------------------------------
def _retry_after(headers: Message | None) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


def _classify(exc: BaseException, url: str, timeout_s: float) -> _Failure:
    """Turn whatever urllib raised into a one-line reason, and decide whether to retry."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        if isinstance(exc.reason, BaseException):
            exc = exc.reason
        else:
            return _Failure(str(exc.reason), retriable=False)
    if isinstance(exc, TimeoutError):
        return _Failure(f"timed out after {timeout_s:g} s", retriable=True, network=True)
    host = urllib.parse.urlsplit(url).hostname or "?"
    if isinstance(exc, socket.gaierror):
        # "Name or service not known" will not change in a second; "try again" might.
        transient = exc.errno == getattr(socket, "EAI_AGAIN", None)
        return _Failure(
            f"DNS lookup failed for {host}: {exc.strerror or exc}",
            retriable=transient,
            network=True,
        )
    if isinstance(exc, ConnectionRefusedError):
        return _Failure(f"connection refused by {host}", retriable=True, network=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Failure(
            f"TLS certificate rejected for {host}: {exc.verify_message}", retriable=False
        )
    if isinstance(exc, ConnectionError | HTTPException | ssl.SSLError):
        return _Failure(
            f"connection lost ({type(exc).__name__}: {exc})", retriable=True, network=True
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return _Failure(f"network unreachable for {host}", retriable=True, network=True)
    return _Failure(f"{type(exc).__name__}: {exc}", retriable=False)


def _attempt(
    url: str,
    dest: Path,
    timeout_s: float,
    on_start: Callable[[int | None], None] | None,
    on_bytes: Callable[[int], None] | None,
) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        # The timeout bounds the connection and every read: a server that stops sending
        # for timeout_s seconds fails the attempt.
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        raise _Failure(
            f"HTTP {e.code}",
            retriable=e.code >= 500 or e.code in _RETRIABLE_STATUS,
            retry_after=_retry_after(e.headers),
        ) from None
    except Exception as e:
        raise _classify(e, url, timeout_s) from None
    with response:
        expected = response.length
        if on_start is not None:
            on_start(expected)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp"
        )
        try:
            got = 0
            with os.fdopen(fd, "wb") as f:
                try:
                    while chunk := response.read1(_CHUNK):
                        f.write(chunk)
                        got += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                except (OSError, HTTPException) as e:
                    raise _classify(e, url, timeout_s) from None
                f.flush()
                os.fsync(f.fileno())
            if expected is not None and got < expected:
                raise _Failure(
                    f"incomplete download: {got} of {expected} bytes",
                    retriable=True,
                    network=True,
                )
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _fetch(
    url: str,
    dest: Path,
    *,
    timeout_s: float,
    retries: int,
    on_start: Callable[[int | None], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Download with bounded retries and exponential backoff; raises _Failure."""
    _check_scheme(url)
    attempt = 0
    while True:
        attempt += 1
        try:
            _attempt(url, dest, timeout_s, on_start, on_bytes)
            return
        except _Failure as failure:
            failure.attempts = attempt
            if not failure.retriable or attempt > retries:
                raise
            wait = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if failure.retry_after is not None:
                wait = max(wait, min(failure.retry_after, 4 * BACKOFF_MAX_S))
            time.sleep(wait)


class _Hosts:
    """Per-host tally: stop hammering a host that cannot be reached at all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok: Counter[str] = Counter()
        self._down: Counter[str] = Counter()
        self._last: dict[str, str] = {}

    def blocked(self, host: str) -> str | None:
        with self._lock:
            if self._ok[host] == 0 and self._down[host] >= HOST_FAILURE_LIMIT:
                return (
                    f"not tried: {host} unreachable ({self._down[host]} URLs failed, "
                    f"last: {self._last[host]})"
                )
            return None

    def record(self, host: str, failure: _Failure | None) -> None:
        with self._lock:
            if failure is None:
                self._ok[host] += 1
            elif failure.network:
                self._down[host] += 1
                self._last[host] = failure.message


# -- public API -----------------------------------------------------------------------------
def download_many(
    urls: Sequence[str],
    *,
    workers: int = 8,
    timeout_s: float = 20,
    retries: int = 2,
    cache: Path | None = None,
    desc: str = "download",
) -> dict[str, DownloadResult]:
    """Fetch many URLs concurrently into the cache; one result per distinct URL, in input
    order. Failures are returned (`path=None`, `error` set), never raised. Cached URLs are
    not requested again. file:// URLs and plain paths are checked on disk, not copied."""
    cache = _ready_cache(cache)
    unique = list(dict.fromkeys(urls))
    results: dict[str, DownloadResult] = {}
    todo: list[str] = []
    for url in unique:
        local = _local_path(url)
        if local is not None:
            ok = local.is_file()
            results[url] = DownloadResult(
                url, local if ok else None, None if ok else "no such file"
            )
            continue
        dest = cached_path(url, cache)
        if dest.is_file():
            results[url] = DownloadResult(url, dest, None)
        else:
            todo.append(url)

    hosts = _Hosts()

    def one(url: str) -> DownloadResult:
        host = urllib.parse.urlsplit(url).hostname or ""
        blocked = hosts.blocked(host)
        if blocked is not None:
            return DownloadResult(url, None, blocked)
        dest = cached_path(url, cache)
        try:
            _fetch(url, dest, timeout_s=timeout_s, retries=retries)
        except _Failure as failure:
            hosts.record(host, failure)
            return DownloadResult(url, None, failure.message)
        except Exception as e:  # a disk error, say: reported with the URL, never raised
            return DownloadResult(url, None, " ".join(f"{type(e).__name__}: {e}".split()))
        hosts.record(host, None)
        return DownloadResult(url, dest, None)

    failed = sum(r.error is not None for r in results.values())
    with tqdm(
        total=len(unique),
        initial=len(unique) - len(todo),
        desc=desc,
        unit="file",
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
    ) as bar:
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
        try:
            for future in as_completed([pool.submit(one, url) for url in todo]):
                result = future.result()
                results[result.url] = result
                failed += result.error is not None
                bar.update(1)
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
        finally:
            # On Ctrl-C, do not start the queued downloads; running ones finish or time out.
            pool.shutdown(wait=True, cancel_futures=True)
    return {url: results[url] for url in unique}


def download_file(
    url: str, *, timeout_s: float = 60, retries: int = 2, cache: Path | None = None
) -> Path:
    """Fetch one (big) file into the cache with a byte progress bar and return its path;
    a cached copy is returned without any request. Raises DownloadError."""
    local = _local_path(url)
    if local is not None:
        if local.is_file():
            return local
        raise DownloadError(url, f"no such file: {local}")
    cache = _ready_cache(cache)
    dest = cached_path(url, cache)
    if dest.is_file():
        return dest
    name = url_file_name(url) or url
    bar: tqdm | None = None

    def on_start(total: int | None) -> None:
        # The bar appears once the server answers (an offline run prints only the error),
        # and starts over on every retry.
        nonlocal bar
        if bar is None:
            bar = tqdm(
                desc=f"download {name}",
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                mininterval=0.5,
                dynamic_ncols=True,
            )
        else:
            bar.reset(total=total)

    def on_bytes(n: int) -> None:
        assert bar is not None
        bar.update(n)

    try:
        _fetch(
            url, dest, timeout_s=timeout_s, retries=retries, on_start=on_start, on_bytes=on_bytes
        )
    except _Failure as failure:
        raise DownloadError(url, failure.message, network=failure.network) from None
    finally:
        if bar is not None:
            bar.close()
    return dest
