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
import re
import socket
import ssl
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tqdm import tqdm
from urllib3 import BaseHTTPResponse, PoolManager, Timeout
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.retry import Retry

from imgclf.config import cache_dir
from imgclf.errors import UserError

USER_AGENT = "tf-or-keras-imgclf/0.1 (urllib3)"
# urllib3's exponential backoff: about BACKOFF_S * 2**n (plus up to BACKOFF_S of jitter),
# capped at BACKOFF_MAX_S; a server's Retry-After is obeyed up to RETRY_AFTER_MAX_S.
BACKOFF_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 4 * BACKOFF_MAX_S

_CHUNK = 1 << 16
_HTTP_SCHEMES = ("http", "https")
_RETRIABLE_STATUS = frozenset({408, 429, *range(500, 600)})
# Our temporary files: ".<final name>.<pid>.<random>.tmp" (see _clean_stale_tmp).
_TMP_RE = re.compile(r"^\..*\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pool(connections: int) -> PoolManager:
    # One connection per worker and host is kept alive for the next URL (no "pool is full"
    # warnings); urllib3's pools are thread-safe.
    return PoolManager(
        num_pools=16, maxsize=max(1, connections), headers={"User-Agent": USER_AGENT}
    )


class DownloadError(UserError, RuntimeError):
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


@dataclass(frozen=True)
class ByteLimit:
    """The most one download may write, and why (said in the failure)."""

    bytes: int
    why: str

    def refusal(self, found: str) -> str:
        return f"{found}: over the limit of {self.bytes:,} bytes ({self.why}); nothing kept"


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


def web_page(file: Path) -> str | None:
    """None unless `file` starts as an HTML page; then " (titled '...')", or "" untitled. What
    a URL gives instead of the file behind a sharing link, a login or a dead image host."""
    with open(file, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", "replace")
    if not re.match(r"\s*(<!doctype html|<html)", head, re.IGNORECASE):
        return None
    title = re.search(r"<title[^>]*>(.*?)</title>", head, re.IGNORECASE | re.DOTALL)
    return f" (titled {' '.join(title.group(1).split())[:80]!r})" if title else ""


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


def unreachable(url: str, *, timeout_s: float = 10, retries: int = 2) -> str | None:
    """Why the server at `url` cannot be reached (DNS, refused, timed out, TLS), with the same
    retries as a download; None once it answers anything, an error status included."""
    try:
        response = _pool(1).request(
            "GET", url, retries=_policy(retries), timeout=Timeout(connect=timeout_s, read=timeout_s)
        )
    except MaxRetryError as e:
        reason, _ = _reason(e, url, timeout_s)
        return _with_attempts(reason, getattr(e, "attempts", 1))
    except Exception as e:  # what urllib3 raises outside its Retry (a broken TLS stream, say)
        return _one_line(_reason(e, url, timeout_s)[0])
    response.drain_conn()
    return None


# -- one download ---------------------------------------------------------------------------
class _Retry(Retry):
    """urllib3's policy, plus what the pipeline needs from it: a DNS answer "no such host"
    and a rejected TLS certificate are final (they will not change in a second; DNS "try
    again" is retried), a long Retry-After is capped, and the number of attempts survives
    into the error message."""

    def increment(  # type: ignore[override]
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> _Retry:
        if _final(error):
            exc = MaxRetryError(_pool, url or "", error)  # type: ignore[arg-type]
        else:
            try:
                return super().increment(method, url, response, error, _pool, _stacktrace)
            except MaxRetryError as e:
                exc = e
        exc.attempts = _attempts(self) + 1  # type: ignore[attr-defined]
        raise exc

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, RETRY_AFTER_MAX_S)


def _attempts(retry: Retry) -> int:
    """Failed attempts so far (a followed redirect is not a failure)."""
    return sum(h.redirect_location is None for h in retry.history)


def _final(error: Exception | None) -> bool:
    if isinstance(error, NameResolutionError):
        # urllib3 raises it `from` the resolver's socket.gaierror.
        return getattr(error.__cause__, "errno", None) != getattr(socket, "EAI_AGAIN", None)
    return isinstance(error, SSLError) and isinstance(
        error.args[0] if error.args else None, ssl.SSLCertVerificationError
    )


def _policy(retries: int) -> _Retry:
    return _Retry(
        total=None,
        connect=retries,
        read=retries,
        status=retries,
        other=retries,
        redirect=10,
        status_forcelist=_RETRIABLE_STATUS,
        backoff_factor=BACKOFF_S,
        backoff_max=BACKOFF_MAX_S,
        backoff_jitter=BACKOFF_S,
        # The last 5xx/429 is returned, so that the message says "HTTP 503".
        raise_on_status=False,
    )


def _reason(exc: BaseException, url: str, timeout_s: float) -> tuple[str, bool]:
    """A one-line reason for what urllib3 raised, and whether the network was at fault
    (the host could not be reached at all: the machine may be offline)."""
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    host = urllib.parse.urlsplit(url).hostname or "?"
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, NameResolutionError):
        detail = getattr(cause, "strerror", None) or cause or exc
        return f"DNS lookup failed for {host}: {detail}", True
    if isinstance(exc, NewConnectionError):
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {host}", True
        if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"network unreachable for {host}", True
        if isinstance(cause, TimeoutError):
            return f"timed out after {timeout_s:g} s", True
        return f"could not connect to {host}: {cause or exc}", True
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return f"timed out after {timeout_s:g} s", True
    if isinstance(exc, SSLError):
        inner = exc.args[0] if exc.args else exc
        if isinstance(inner, ssl.SSLCertVerificationError):
            return f"TLS certificate rejected for {host}: {inner.verify_message}", False
        return f"TLS error with {host}: {inner}", True
    if isinstance(exc, ProtocolError):
        return f"connection lost ({exc})", True
    return f"{type(exc).__name__}: {exc}", False


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _with_attempts(reason: str, attempts: int) -> str:
    return _one_line(reason) + (f" ({attempts} attempts)" if attempts > 1 else "")


class _Failure(Exception):
    def __init__(self, message: str, *, network: bool = False, no_host: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.network = network
        self.no_host = no_host  # the host name does not resolve (true of all its URLs)


class _Incomplete(Exception):
    """The body ended before its Content-Length: retried like a dropped connection."""


def _fetch(
    url: str,
    dest: Path,
    *,
    timeout_s: float,
    retries: int,
    pool: PoolManager,
    on_start: Callable[[int | None], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    limit: ByteLimit | None = None,
) -> None:
    """Download into `dest` (whole or not at all). urllib3 retries what fails before the
    body (connection, timeouts, 5xx/408/429, Retry-After); a body that breaks off is
    charged to the same Retry budget and backoff here. A body over `limit` is cut off and
    not retried. Raises _Failure."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _HTTP_SCHEMES:
        raise _Failure(f"unsupported URL scheme {scheme!r} (http, https or file)")
    retry = _policy(retries)
    # The timeout bounds the connection and every read: a server that stops sending for
    # timeout_s seconds fails the attempt.
    timeout = Timeout(connect=timeout_s, read=timeout_s)
    while True:
        try:
            response = pool.request(
                "GET", url, retries=retry, timeout=timeout, preload_content=False
            )
        except MaxRetryError as e:
            reason, network = _reason(e, url, timeout_s)
            no_host = isinstance(e.reason, NameResolutionError)
            raise _Failure(
                _with_attempts(reason, getattr(e, "attempts", 1)),
                network=network,
                no_host=no_host,
            ) from None
        except Exception as e:
            reason, network = _reason(e, url, timeout_s)
            raise _Failure(_one_line(reason), network=network) from None
        used = response.retries or retry
        if response.status != 200:
            response.drain_conn()
            response.release_conn()
            raise _Failure(_with_attempts(f"HTTP {response.status}", _attempts(used) + 1))
        try:
            _write_body(response, dest, on_start, on_bytes, limit)
            response.release_conn()
            return
        except _Failure:
            response.close()  # the rest of the body is never read
            response.release_conn()
            raise
        except (_Incomplete, ProtocolError, ReadTimeoutError, SSLError) as e:
            # A broken connection must not go back to the pool.
            response.close()
            response.release_conn()
            error = ProtocolError(str(e)) if isinstance(e, _Incomplete) else e
            try:
                retry = used.increment("GET", url, error=error)
            except MaxRetryError as exhausted:
                reason = str(e) if isinstance(e, _Incomplete) else _reason(e, url, timeout_s)[0]
                attempts = getattr(exhausted, "attempts", 1)
                raise _Failure(_with_attempts(reason, attempts), network=True) from None
            retry.sleep()


def _write_body(
    response: BaseHTTPResponse,
    dest: Path,
    on_start: Callable[[int | None], None] | None,
    on_bytes: Callable[[int], None] | None,
    limit: ByteLimit | None = None,
) -> None:
    length = response.headers.get("Content-Length")
    expected = int(length) if length is not None and length.isdigit() else None
    if limit is not None and expected is not None and expected > limit.bytes:
        raise _Failure(limit.refusal(f"Content-Length {expected:,}"))
    if on_start is not None:
        on_start(expected)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp"
    )
    # A body sent with a Content-Encoding (gzip, deflate...: a server may compress, since no
    # Accept-Encoding says otherwise) is stored decoded, as the file it stands for. The limit
    # counts the decoded bytes written (a gzip bomb is cut off); Content-Length and the
    # progress bar count the bytes on the wire, `response.tell()`.
    written = on_wire = 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                # urllib3 refuses a body shorter than its Content-Length with ProtocolError;
                # counting the bytes gives the message its figures.
                # read1: whatever has arrived, so the progress bar moves with the bytes.
                while chunk := response.read1(_CHUNK, decode_content=True):
                    written += len(chunk)
                    if limit is not None and written > limit.bytes:
                        raise _Failure(limit.refusal("the body went on, cut off"))
                    f.write(chunk)
                    if on_bytes is not None:
                        on_bytes(response.tell() - on_wire)
                    on_wire = response.tell()
            except DecodeError as e:
                encoding = response.headers.get("Content-Encoding")
                raise _Failure(
                    f"the body is not the Content-Encoding {encoding!r} it was sent as "
                    f"({_one_line(str(e))}); nothing kept"
                ) from None
            except ProtocolError:
                on_wire = response.tell()
                if expected is not None and on_wire < expected:
                    raise _Incomplete(
                        f"incomplete download: {on_wire} of {expected} bytes"
                    ) from None
                raise
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and on_wire < expected:
            raise _Incomplete(f"incomplete download: {on_wire} of {expected} bytes")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- public API -----------------------------------------------------------------------------
def download_many(
    urls: Sequence[str],
    *,
    workers: int = 8,
    timeout_s: float = 20,
    retries: int = 2,
    cache: Path | None = None,
    desc: str = "download",
    limit: ByteLimit | None = None,
) -> dict[str, DownloadResult]:
    """Fetch many URLs concurrently into the cache; one result per distinct URL, in input
    order. Failures are returned (`path=None`, `error` set), never raised. Cached URLs are
    not requested again. file:// URLs and plain paths are checked on disk, not copied. A
    response over `limit` (say, a video, or a server that never stops) fails, nothing kept."""
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

    pool = _pool(workers)
    # Hosts whose name did not resolve: their other URLs fail with the same answer at once
    # (an export of 277 images on one dead host, offline, is then one lookup, not 277
    # concurrent ones that the resolver serialises).
    no_host: dict[str, str] = {}

    def one(url: str) -> DownloadResult:
        host = urllib.parse.urlsplit(url).hostname or ""
        if host in no_host:
            return DownloadResult(url, None, no_host[host])
        dest = cached_path(url, cache)
        try:
            _fetch(url, dest, timeout_s=timeout_s, retries=retries, pool=pool, limit=limit)
        except _Failure as failure:
            if failure.no_host:
                no_host.setdefault(host, failure.message)
            return DownloadResult(url, None, failure.message)
        except Exception as e:  # a disk error, say: reported with the URL, never raised
            return DownloadResult(url, None, _one_line(f"{type(e).__name__}: {e}"))
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
        executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
        try:
            for future in as_completed([executor.submit(one, url) for url in todo]):
                result = future.result()
                results[result.url] = result
                failed += result.error is not None
                bar.update(1)
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
        finally:
            # On Ctrl-C, do not start the queued downloads; running ones finish or time out.
            executor.shutdown(wait=True, cancel_futures=True)
    return {url: results[url] for url in unique}


def download_file(
    url: str,
    *,
    timeout_s: float = 60,
    retries: int = 2,
    cache: Path | None = None,
    limit: ByteLimit | None = None,
) -> Path:
    """Fetch one (big) file into the cache with a byte progress bar and return its path;
    a cached copy is returned without any request. A response over `limit` fails, nothing
    kept. Raises DownloadError."""
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
            url,
            dest,
            timeout_s=timeout_s,
            retries=retries,
            pool=_pool(1),
            on_start=on_start,
            on_bytes=on_bytes,
            limit=limit,
        )
    except _Failure as failure:
        raise DownloadError(url, failure.message, network=failure.network) from None
    finally:
        if bar is not None:
            bar.close()
    return dest
