"""A real HTTP server on 127.0.0.1 for tests: files from a folder or a dict, with
per-path delays, status codes, truncated, stalled or endless bodies, and a request count per
path.

    with LoopbackServer({"a.jpg": data}, statuses={"gone.jpg": 404}, delays={"slow.jpg": 2}) as srv:
        results = download_many([srv.url("a.jpg"), srv.url("gone.jpg")])
        assert srv.count("a.jpg") == 1

`statuses` and `delays` take a single value or a sequence (one per request, the last one
repeating), so "fails twice, then works" is `statuses={"x": [503, 503, 200]}`.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Content = bytes | Path


def _key(path: str) -> str:
    """'a/b.jpg', '/a/b.jpg' and '/a/b.jpg?x=1' all name the same resource."""
    path = urllib.parse.urlsplit(path).path
    return "/" + urllib.parse.unquote(path).lstrip("/")


def _nth(value, n: int):
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return value[min(n, len(value) - 1)] if value else None
    return value


class LoopbackServer:
    """Context manager serving `files` (a folder, or a mapping of path -> bytes or Path)."""

    def __init__(
        self,
        files: Path | str | Mapping[str, Content] = (),
        *,
        delays: Mapping[str, float | Sequence[float]] | None = None,
        statuses: Mapping[str, int | Sequence[int]] | None = None,
        truncate: Mapping[str, int] | None = None,
        stall: Mapping[str, int] | None = None,
        headers: Mapping[str, Mapping[str, str]] | None = None,
        endless: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        self.root = Path(files) if isinstance(files, str | Path) else None
        self.files = {} if self.root else {_key(k): v for k, v in dict(files).items()}
        self.delays = {_key(k): v for k, v in (delays or {}).items()}
        self.statuses = {_key(k): v for k, v in (statuses or {}).items()}
        # Announce the full Content-Length but send only this many bytes, then hang up.
        self.truncate = {_key(k): v for k, v in (truncate or {}).items()}
        # Send this many bytes, then go silent until the server stops (a hung transfer).
        self.stall = {_key(k): v for k, v in (stall or {}).items()}
        self.headers = {_key(k): dict(v) for k, v in (headers or {}).items()}
        # No Content-Length, and bytes until the client hangs up (a stream, a broken server).
        self.endless = {_key(k) for k in endless}
        self.endless_sent: Counter[str] = Counter()  # bytes written to each endless path
        self.port = port  # 0: any free port; pass an old server's port to keep its URLs
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- what tests use -------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "use the server inside its `with` block"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + urllib.parse.quote(_key(path))

    def count(self, path: str) -> int:
        with self._lock:
            return self.counts[_key(path)]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()

    # -- serving --------------------------------------------------------------------------
    def _content(self, key: str) -> bytes | None:
        if self.root is not None:
            rel = Path(key.lstrip("/"))
            if ".." in rel.parts:
                return None
            path = self.root / rel
            return path.read_bytes() if path.is_file() else None
        value = self.files.get(key)
        if isinstance(value, Path):
            return value.read_bytes()
        return value

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _start(self, status: int, content_type: str, length: int, key: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                for name, value in server.headers.get(key, {}).items():
                    self.send_header(name, value)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _endless(self, key: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunk = b"\xff" * 65536
                try:
                    while not server._stop.is_set():
                        self.wfile.write(chunk)
                        with server._lock:
                            server.endless_sent[key] += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: what a size limit does

            def do_HEAD(self) -> None:
                self._respond(body=False)

            def do_GET(self) -> None:
                self._respond(body=True)

            def _respond(self, body: bool) -> None:
                key = _key(self.path)
                with server._lock:
                    n = server.counts[key]
                    server.counts[key] += 1
                delay = _nth(server.delays.get(key), n)
                # An Event wait, not time.sleep, so leaving the `with` block is not held up.
                if delay and server._stop.wait(delay):
                    return
                if key in server.endless:
                    self._endless(key)
                    return
                content = server._content(key)
                status = _nth(server.statuses.get(key), n) or (200 if content is not None else 404)
                if status != 200 or content is None:
                    payload = f"status {status} for {key}\n".encode()
                    self._start(status, "text/plain", len(payload), key)
                    self.end_headers()
                    if body:
                        self.wfile.write(payload)
                    return
                self._start(200, "application/octet-stream", len(content), key)
                cut = server.truncate.get(key)
                if cut is not None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if not body:
                    return
                hang = server.stall.get(key)
                if hang is not None:
                    self.wfile.write(content[:hang])
                    self.wfile.flush()
                    server._stop.wait()
                    self.close_connection = True
                    return
                self.wfile.write(content if cut is None else content[:cut])
                self.wfile.flush()

        return Handler

    def __enter__(self) -> LoopbackServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        self.port = self._server.server_address[1]
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def free_port() -> int:
    """A port of 127.0.0.1 where nothing listens. It was free a moment ago; nothing in a test
    run re-binds it that fast."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url(path: str = "x") -> str:
    """A URL on 127.0.0.1 where nothing listens: a real 'connection refused'."""
    return f"http://127.0.0.1:{free_port()}/{path.lstrip('/')}"
