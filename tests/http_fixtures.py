"""A real HTTP file server on the loopback interface, for the download tests.

`FileServer` serves bytes from a dict (URL path -> bytes) on 127.0.0.1 at a free
port, answers `Range: bytes=N-` requests with 206 Partial Content like a real web
server, and can misbehave on purpose: fail every request with a status, or close the
connection after half of a file's bytes. It logs every request it receives.
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # keep stderr for the code under test
        pass

    def do_GET(self):
        owner = self.server.owner
        range_header = self.headers.get("Range")

        def log(status: int) -> None:
            # logged before the answer goes out, so a client that has its bytes
            # always finds its request in the log
            with owner.lock:
                owner.requests.append({"path": self.path, "range": range_header, "status": status})

        if owner.fail_status is not None:
            log(owner.fail_status)
            self.send_error(owner.fail_status)
            return
        body = owner.files.get(self.path)
        if body is None:
            log(404)
            self.send_error(404)
            return
        status, start, end = 200, 0, len(body)
        if range_header and owner.honor_range:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header)
            if match is None:
                log(400)
                self.send_error(400, "unsupported Range header")
                return
            start = int(match[1])
            end = int(match[2]) + 1 if match[2] else len(body)
            if start >= len(body):
                log(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:end]
        log(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with owner.lock:
            cut = self.path in owner.cut_once
            owner.cut_once.discard(self.path)
        if cut:
            # announce the whole length, send half, hang up: a dropped connection
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FileServer


class FileServer:
    """Serve `files` ({"/124M/hparams.json": b"...", ...}) on a free loopback port.

    fail_status: answer every request with this HTTP status (e.g. 500).
    cut_once: paths whose first request is cut off after half of the bytes.
    honor_range: False makes the server ignore Range headers (answers 200 in full).
    """

    def __init__(
        self,
        files: dict[str, bytes],
        fail_status: int | None = None,
        cut_once: tuple[str, ...] = (),
        honor_range: bool = True,
    ):
        self.files = dict(files)
        self.fail_status = fail_status
        self.cut_once = set(cut_once)
        self.honor_range = honor_range
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # a short poll interval: shutdown() waits up to one interval
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def requests_for(self, path: str) -> list[dict]:
        """The logged requests for one URL path."""
        with self.lock:
            return [r for r in self.requests if r["path"] == path]


def closed_port_url() -> str:
    """A loopback URL where nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def no_proxy(monkeypatch):
    """Make sure urllib talks to 127.0.0.1 directly even where a proxy is set."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
