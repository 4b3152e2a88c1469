"""Robust file downloads: resumed `.part` files, size and time limits, and network
errors explained with the usual fix. Used by `course.gpt2_files` (GPT-2's checkpoints,
notebook 04) and `course.data` (the instruction data, notebook 01).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from course.artifacts import sha256_of_file


def describe_network_error(exc: BaseException, url: str | None = None) -> str:
    """A short explanation of a failed download, with the usual fix.

    `url`, when given, lets it name the proxy setting the download went through.
    """
    import ssl

    reason = getattr(exc, "reason", exc)
    text = str(reason).rstrip(".")
    if isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"{text}. The server's TLS certificate could not be verified, so nothing was "
            "downloaded. On macOS, run 'Install Certificates.command' from your Python's "
            "folder in Applications. Behind a company proxy or antivirus that inspects "
            "HTTPS, set the environment variable SSL_CERT_FILE to its certificate bundle "
            "(a .pem file from your IT department) and restart Jupyter."
        )
    if isinstance(reason, ssl.SSLError):
        return (
            f"{text}. The secure (TLS) connection failed: a proxy, firewall or antivirus "
            "may be in the way. Try another network, or set HTTPS_PROXY to your proxy."
        )
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 407:
            return (
                "HTTP 407 Proxy Authentication Required: the proxy wants a user name and "
                "password. Put them into the proxy address: "
                "HTTPS_PROXY=http://user:password@proxy:8080."
            )
        return f"HTTP {exc.code} {exc.reason}"
    parts = urllib.parse.urlsplit(url or "https://")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not (parts.hostname and urllib.request.proxy_bypass(parts.hostname)):
        proxy = re.sub(r"//[^/@]*@", "//", proxy)  # never print a proxy password
        return (
            f"{text}. The download goes through the proxy {proxy} (environment variable "
            f"{parts.scheme.upper()}_PROXY): check that address and that the proxy runs, "
            "or unset the variable if you are not behind a proxy."
        )
    return (
        f"{text}. Check the internet connection; behind a proxy set HTTPS_PROXY "
        "(for example HTTPS_PROXY=http://proxy:8080) before starting Jupyter."
    )


class DownloadTooLarge(ValueError):
    """A download passed the size allowed for it; nothing of it was kept."""

    def __init__(self, url: str, limit: int, size: int | None = None):
        self.url, self.limit, self.size = url, limit, size
        said = f"announces {size:,} bytes, more than" if size is not None else "sent more than"
        super().__init__(
            f"The download from {url} {said} the {limit:,} bytes allowed for it, so it was "
            "stopped and nothing of it was kept. Check that the address names the file you meant."
        )


class DownloadWriteError(RuntimeError):
    """A download could not be saved on this machine (a full disk, a folder not writable).

    The network is not to blame, so the partial file is deleted; the message says what
    to do. (Not an OSError, so that code catching network errors does not mistake it
    for one.)
    """

    def __init__(self, url: str, path: Path, exc: OSError):
        self.url, self.path, self.os_error = url, path, exc
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            what = f"the disk is full ({reason})"
            fix = "Free some space on that disk, or keep the file on another one"
        elif exc.errno == errno.EFBIG:
            what = f"the file system refuses a file this large ({reason})"
            fix = "Keep the file on another disk"
        elif exc.errno == errno.ENAMETOOLONG:
            what = f"the file name is too long for this file system ({reason})"
            fix = "Keep the file in a folder with a shorter path"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            what = f"the folder is not writable ({reason})"
            fix = "Keep the file in a folder you can write to"
        else:
            what = reason
            fix = "Fix the cause"
        super().__init__(
            f"Could not save the download of {url} as {path}: {what}. This is not a "
            "network problem; the partial file was deleted. "
            f"{fix} (COURSE_ARTIFACTS chooses the folder of datasets, COURSE_MODELS_DIR "
            "that of GPT-2 weights) and run the cell again."
        )


class _Watch:
    """The sockets of one download, shut down when its time is up (`expire`)."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.lock = threading.Lock()

    def add(self, sock) -> None:
        with self.lock:
            self.sockets.append(sock)
            if not self.expired:
                return
        self._shut(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            sockets = list(self.sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        with contextlib.suppress(OSError, ValueError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a read that waits for data


class _WatchedHandler:
    """urllib's HTTP(S) handler, but every connection's socket is given to a `_Watch`."""

    watch: _Watch

    def do_open(self, http_class, req, **kwargs):
        watch = self.watch

        class Connection(http_class):
            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                create = self._create_connection

                def create_and_watch(*a, **k):
                    sock = create(*a, **k)
                    watch.add(sock)
                    return sock

                self._create_connection = create_and_watch

            def connect(self):
                super().connect()
                watch.add(self.sock)  # for HTTPS: the TLS socket over the one above

        return super().do_open(Connection, req, **kwargs)


class _HTTPHandler(_WatchedHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedHandler, urllib.request.HTTPSHandler):
    pass


def _open_watched(request: urllib.request.Request, watch: _Watch, timeout: float):
    """urlopen (with the proxy settings of the environment), its sockets in `watch`."""
    handlers = [_HTTPHandler(), _HTTPSHandler()]
    for handler in handlers:
        handler.watch = watch
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)


def _too_slow(url: str, max_seconds: float) -> TimeoutError:
    return TimeoutError(
        f"the download took longer than the {max_seconds:,.0f} s allowed for it in all; "
        "what arrived is kept, and running the cell again continues from there"
    )


def download_file(
    url: str,
    destination: str | Path,
    show_progress: bool = True,
    expected_sha256: str | None = None,
    max_bytes: int | None = None,
    max_seconds: float | None = None,
) -> Path:
    """Download `url` to `destination`, resuming a partial download.

    Bytes arrive in `destination.part`; the file gets its final name only when
    complete (and, with `expected_sha256`, when its checksum matches), so an existing
    `destination` is always whole and is skipped. A mismatch deletes the download
    and raises ValueError.

    Each wait for the server lasts at most 60 s. `max_bytes` bounds the file's size:
    a larger one (announced, or streaming past it) is stopped and deleted
    (DownloadTooLarge). `max_seconds` bounds the whole download, connecting and
    headers included: past it, TimeoutError, and the bytes so far are kept for the
    next try. A file that cannot be written (a full disk) raises DownloadWriteError
    and deletes the partial file.
    """
    destination = Path(destination)
    if destination.exists():
        return destination
    part = destination.with_name(destination.name + ".part")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadWriteError(url, destination, exc) from None
    watch = _Watch()
    timer = None
    if max_seconds is not None:
        timer = threading.Timer(max_seconds, watch.expire)
        timer.daemon = True
        timer.start()
    try:
        _download(url, part, watch, show_progress, max_bytes)
    except DownloadWriteError:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    except (OSError, http.client.HTTPException):
        if watch.expired:
            raise _too_slow(url, max_seconds) from None
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if watch.expired:  # the connection was shut mid-file: it looks like an early end
        raise _too_slow(url, max_seconds)
    if expected_sha256 is not None:
        actual = sha256_of_file(part)
        if actual != expected_sha256.lower():
            part.unlink()
            raise ValueError(
                f"The file downloaded from {url} has SHA-256 {actual}, but {expected_sha256} "
                "was expected: it is not the file this course was written for (it changed "
                "on the server, or a proxy or login page answered instead). The download "
                "was deleted. Run the cell again; if this repeats, download the file in a "
                f"browser and save it as {destination}."
            )
    try:
        os.replace(part, destination)
    except OSError as exc:
        raise DownloadWriteError(url, destination, exc) from None
    return destination


def _download(
    url: str, part: Path, watch: _Watch, show_progress: bool, max_bytes: int | None
) -> None:
    """Fetch `url` into `part`, continuing what it holds (see `download_file`)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = _open_watched(request, watch, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        # 416 "range not satisfiable": the part file already holds all the bytes,
        # unless the server's size ("bytes */SIZE") says it belongs to another file
        size = re.fullmatch(r"bytes \*/(\d+)", (exc.headers or {}).get("Content-Range", ""))
        if size is not None and int(size[1]) != have:
            part.unlink()
            return _download(url, part, watch, show_progress, max_bytes)
        if max_bytes is not None and have > max_bytes:
            part.unlink()
            raise DownloadTooLarge(url, max_bytes, have) from None
        return
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        if max_bytes is not None and total is not None and total > max_bytes:
            with contextlib.suppress(OSError):
                part.unlink()
            raise DownloadTooLarge(url, max_bytes, total)
        try:
            f = open(part, "ab" if have else "wb")
        except OSError as exc:
            raise DownloadWriteError(url, part, exc) from None
        size = have
        try:
            with tqdm(
                total=total,
                initial=have,
                unit="iB",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                disable=not show_progress,
            ) as bar:
                # read1: whatever has arrived, so a slow server is seen between pieces
                for chunk in iter(lambda: response.read1(1 << 16), b""):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        f.close()
                        part.unlink()
                        raise DownloadTooLarge(url, max_bytes)
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise DownloadWriteError(url, part, exc) from None
                    bar.update(len(chunk))
        finally:
            try:
                f.close()
            except OSError as exc:  # the last buffered bytes did not fit
                raise DownloadWriteError(url, part, exc) from None
    if watch.expired:
        return
    if total is not None and part.stat().st_size != total:
        raise ConnectionError(
            f"Download of {url} stopped after {part.stat().st_size} of {total} bytes. "
            "Run the cell again: it continues where it stopped."
        )
