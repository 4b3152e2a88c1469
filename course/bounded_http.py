"""HTTP requests with a hard end: a deadline for the whole answer (connecting, headers,
body) and a limit on the bytes read, whatever the server does. Used by
`course.ollama_client`, the judge's client (notebooks 09 and 11, run_course.py).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.parse
import urllib.request


class Deadlines:
    """Closes the connections of requests whose time is up, wherever they are waiting.

    A socket timeout bounds each wait for data, not the whole answer: a server that
    sends its headers or body one byte at a time, each within the timeout, could keep
    a request alive for ever. Each connection made through `bounded_opener` gets a
    timer that shuts its socket down at its deadline, whether the request is
    connecting, reading headers or reading the body; `expired` then says why it ended.
    """

    def __init__(self, deadline: float | None = None, max_seconds: float = 600):
        self.deadline, self.max_seconds = deadline, max_seconds
        self.expired = False
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()

    def deadline_of_new_connection(self) -> float:
        return self.deadline if self.deadline is not None else time.monotonic() + self.max_seconds

    def watch(self, sock: socket.socket, deadline: float) -> None:
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire, (sock,))
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def _expire(self, sock: socket.socket) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()


def bounded_opener(deadlines: Deadlines, piece_timeout: float, direct: bool):
    """A urllib opener whose connections obey `deadlines` and wait at most `piece_timeout`."""

    def bounded(connection_class):
        class Bounded(connection_class):
            def connect(self):
                deadline = deadlines.deadline_of_new_connection()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    deadlines.expired = True
                    raise TimeoutError("timed out: no time left to connect")
                given = self.timeout if isinstance(self.timeout, (int, float)) else piece_timeout
                self.timeout = max(0.05, min(given, piece_timeout, remaining))
                super().connect()
                deadlines.watch(self.sock, deadline)

        return Bounded

    http_connection = bounded(http.client.HTTPConnection)
    https_connection = bounded(http.client.HTTPSConnection)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_connection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_connection, req, context=self._context)

    handlers = [HTTPHandler(), HTTPSHandler()]
    if direct:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def is_local(url: str) -> bool:
    """Whether `url` names this machine (its requests then skip any proxy)."""
    return urllib.parse.urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1")


@contextlib.contextmanager
def open_until(request: str | urllib.request.Request, timeout: float, deadline: float):
    """Open `request` (straight to a server on this machine, past any proxy), all of it over by `deadline`.

    `deadline` is a time.monotonic() value that covers connecting, the headers and the
    body read inside the `with` block; each wait for data lasts at most `timeout`
    seconds. Passing the deadline anywhere raises TimeoutError.
    """
    url = request if isinstance(request, str) else request.full_url
    deadlines = Deadlines(deadline)
    opener = bounded_opener(deadlines, timeout, direct=is_local(url))
    try:
        with opener.open(request, timeout=timeout) as response:
            yield response
    except (OSError, http.client.HTTPException, ValueError):
        if deadlines.expired:  # the timer shut the socket: say so, not "connection reset"
            raise TimeoutError("timed out: the answer took longer than the time allowed") from None
        raise
    finally:
        deadlines.cancel()


def _socket_of(response) -> socket.socket | None:
    """The socket under an http.client response (to shorten its timeout), if reachable."""
    raw = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def read_bounded(response, limit: int, deadline: float, timeout: float):
    """Yield the body of `response` piece by piece: at most `limit` bytes, until `deadline`.

    Each wait for data lasts at most `timeout` seconds and never past `deadline` (a
    time.monotonic() value). More than `limit` bytes raises ValueError; passing the
    deadline raises TimeoutError. So a server that streams forever, fast or one byte
    at a time, costs at most `limit` bytes of memory and ends at the deadline.
    """
    sock, received = _socket_of(response), 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out: the whole answer took longer than the time allowed")
        if sock is not None:
            sock.settimeout(min(timeout, remaining))
        piece = response.read1(min(65536, limit + 1 - received))
        if not piece:
            return
        received += len(piece)
        if received > limit:
            raise ValueError(f"the answer is longer than {limit:,} bytes")
        yield piece
