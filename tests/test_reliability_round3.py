"""Downloads with bounds, odd dataset files, settings with underscores, dying kernels.

Every failure is reproduced as a student meets it: hostile HTTP servers on a loopback
port (one that never stops sending, one that trickles its body or its headers, one
that announces a file larger than any GPT-2), a real write failing with ENOSPC
(/dev/full) or EFBIG (a file-size limit set in a child process), real files with
odd content and long names, and a notebook kernel killed with SIGKILL, as the
system's out-of-memory killer does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from http_fixtures import FileServer, no_proxy  # noqa: F401

import run_course
from course import artifacts, data, settings, weights
from course.data import DatasetError, load_instruction_data

ROOT = Path(__file__).resolve().parent.parent
DATASET = (ROOT / "instruction-data.json").read_bytes()
ENTRIES = [
    {"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(20)
]


# -- hostile servers -------------------------------------------------------------------


class RawServer:
    """A loopback TCP server that answers each connection with `behave(conn)`.

    `behave` gets the accepted socket after the request's headers were read and
    speaks HTTP by hand, so it can misbehave in ways http.server cannot.
    """

    def __init__(self, behave: Callable[[socket.socket], None]):
        self.behave = behave
        self.stopped = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    request += piece
                self.behave(conn)
            except OSError:  # the client hung up: what the bounds are for
                pass


def endless(announce: int | None = None, cap: int = 64 << 20):
    """Send a JSON list that never ends (safety stop after `cap` bytes)."""

    def behave(conn: socket.socket) -> None:
        length = f"Content-Length: {announce}\r\n" if announce is not None else ""
        conn.sendall(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{length}"
            "Connection: close\r\n\r\n[".encode()
        )
        piece, sent = b'"x", ' * 13_000, 0
        while sent < cap:
            conn.sendall(piece)
            sent += len(piece)

    return behave


def trickle_body(conn: socket.socket) -> None:
    """Announce a megabyte, then send one byte every 50 ms (for 10 s at most)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n")
    for _ in range(200):
        conn.sendall(b" ")
        time.sleep(0.05)


def trickle_headers(conn: socket.socket) -> None:
    """Send the headers one byte every 50 ms, and never finish them (10 s at most)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(200):
        conn.sendall(b"a")
        time.sleep(0.05)


@pytest.fixture
def course_env(tmp_path, monkeypatch, no_proxy):  # noqa: F811
    """COURSE_ARTIFACTS in tmp_path, the other dataset settings at their defaults."""
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path / "artifacts"))
    for name in ("COURSE_DATASET", "COURSE_DATA_LIMIT", "COURSE_DATASET_MAX_MB"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "artifacts"


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() or p.is_symlink())


# -- item: bounded downloads -----------------------------------------------------------


def test_a_dataset_url_that_never_ends_stops_at_the_limit_and_leaves_nothing(
    course_env, monkeypatch
):
    monkeypatch.setenv("COURSE_DATASET_MAX_MB", "2")
    with RawServer(endless()) as server:
        monkeypatch.setenv("COURSE_DATASET", server.url + "/endless.json")
        started = time.monotonic()
        with pytest.raises(DatasetError) as info:
            data.load_course_data(show_progress=False)
    message = str(info.value)
    assert "more than the 2,000,000 bytes allowed" in message, message
    assert "COURSE_DATASET_MAX_MB=2" in message and "set it higher" in message, message
    assert time.monotonic() - started < 10
    assert files_in(data.data_dir()) == []  # no partial file, no file


def test_an_announced_size_over_the_limit_is_refused_before_any_byte(course_env, monkeypatch):
    monkeypatch.setenv("COURSE_DATASET_MAX_MB", "1")
    with RawServer(endless(announce=5_000_000_000)) as server:
        monkeypatch.setenv("COURSE_DATASET", server.url + "/huge.json")
        with pytest.raises(DatasetError, match=r"announces 5,000,000,000 bytes.*MAX_MB=1"):
            data.load_course_data(show_progress=False)
    assert files_in(data.data_dir()) == []


def test_gpt2_downloads_refuse_a_file_larger_than_any_checkpoint(tmp_path, no_proxy):  # noqa: F811
    with RawServer(endless(announce=10**12)) as server:
        with pytest.raises(ValueError, match="announces 1,000,000,000,000 bytes, more than"):
            weights.download_gpt2_safetensors("124M", tmp_path / "124M", server.url)
    assert files_in(tmp_path) == []
    limit = weights.download_limit("124M")
    assert 620_000_000 < limit < 800_000_000  # 124M float32 weights take 496 MB
    assert weights.download_limit("1558M") > 6_500_000_000  # gpt2-xl's 6.4 GB file fits


@pytest.mark.parametrize("behave", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_a_trickling_download_ends_at_its_deadline(tmp_path, no_proxy, behave):  # noqa: F811
    target = tmp_path / "data.json"
    with RawServer(behave) as server:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            load_instruction_data(target, server.url + "/slow.json", max_seconds=1.0)
        seconds = time.monotonic() - started
    message = str(info.value)
    assert seconds < 4, seconds
    assert "took longer than the 1 s allowed" in message, message
    assert "Run the cell again (it resumes)" in message
    assert not target.exists()
    if behave is trickle_body:  # what arrived is kept for the next try
        assert (tmp_path / "data.json.part").stat().st_size > 0


def test_a_full_disk_is_named_and_the_partial_file_deleted(tmp_path, no_proxy):  # noqa: F811
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    target = tmp_path / "instruction-data.json"
    part = tmp_path / "instruction-data.json.part"
    part.symlink_to("/dev/full")
    with FileServer({"/data.json": DATASET}) as server:
        with pytest.raises(Exception) as info:
            load_instruction_data(target, server.url + "/data.json")
    message = str(info.value)
    assert "the disk is full (No space left on device)" in message, message
    assert "not a network problem" in message and "partial file was deleted" in message
    assert "Free some space" in message and str(part) in message
    assert "internet" not in message and "resumes" not in message
    assert not part.exists() and not part.is_symlink() and not target.exists()
    # not an OSError: code that catches network errors does not take it for one
    assert isinstance(info.value, weights.DownloadWriteError)
    assert not isinstance(info.value, OSError)


def test_a_file_size_limit_deletes_the_real_partial_file(tmp_path, no_proxy):  # noqa: F811
    """A child process may write 100 kB per file (RLIMIT_FSIZE): the OS refuses more."""
    target = tmp_path / "instruction-data.json"
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
from course import data
try:
    data.load_instruction_data({str(target)!r}, sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    with FileServer({"/data.json": DATASET}) as server:
        run = subprocess.run(
            [sys.executable, "-c", script, server.url + "/data.json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"},
        )
    assert len(DATASET) > 100_000
    assert run.stdout.startswith("DownloadWriteError"), run.stdout + run.stderr
    assert "refuses a file this large (File too large)" in run.stdout
    assert "partial file was deleted" in run.stdout
    assert files_in(tmp_path) == []


# -- item: odd dataset files -----------------------------------------------------------


def test_deeply_nested_json_names_the_file_and_the_entry(tmp_path):
    path = tmp_path / "nested.json"
    nested = "[" * 100_000 + "]" * 100_000
    path.write_text(json.dumps(ENTRIES[:2])[:-1] + f', {{"instruction": {nested}}}]')
    with pytest.raises(DatasetError) as info:
        load_instruction_data(path, url="")
    message = str(info.value)
    assert str(path) in message and "entry 2 (line 1, column" in message, message
    assert "nested more than 500 deep" in message and "Fix or remove that entry" in message


def test_a_lone_surrogate_is_caught_when_loading_not_when_saving(course_env, monkeypatch):
    path = course_env.parent / "surrogate.json"
    text = json.dumps(ENTRIES)  # ASCII: every escape below is written as \\uXXXX
    path.write_text(text.replace('"output": "3"', '"output": "3 \\ud800"'))
    monkeypatch.setenv("COURSE_DATASET", str(path))
    with pytest.raises(DatasetError) as info:
        data.save_split(data.load_course_data(show_progress=False))
    message = str(info.value)
    assert str(path) in message and 'entry 3, field "output"' in message, message
    assert "\\ud800" in message and "lone surrogate" in message
    assert not artifacts.split_path().exists()


def test_a_long_legal_file_name_gets_a_short_split_name(course_env, monkeypatch):
    path = course_env.parent / ("d" * 240 + ".json")  # 245 characters: legal
    path.write_text(json.dumps(ENTRIES))
    monkeypatch.setenv("COURSE_DATASET", str(path))
    split = data.save_split(data.load_course_data(show_progress=False))
    written = artifacts.split_path()
    assert written.exists() and len(written.name) < 100, written.name
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    assert split["dataset_tag"] == "d" * settings.TAG_NAME_CHARS + f"-{digest}"
    assert len(data.load_split()[0]) == len(split["train"]) == 17


def test_ordinary_dataset_tags_are_unchanged():
    name = "/home/student/my-data.json"
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    assert settings.dataset_tag(name, 0) == f"my-data-{digest}"
    assert settings.dataset_tag(name, 2000) == f"my-data-{digest}-n2000"
    assert settings.dataset_tag("alpaca", 2000) == "alpaca-n2000"
    assert settings.dataset_tag("book", 0) == "book"


def test_a_long_url_downloads_and_splits(course_env, monkeypatch):
    url_path = "/" + "x" * 250 + ".json"
    with FileServer({url_path: json.dumps(ENTRIES).encode()}) as server:
        monkeypatch.setenv("COURSE_DATASET", server.url + url_path)
        split = data.save_split(data.load_course_data(show_progress=False))
    assert artifacts.split_path().exists() and len(split["train"]) == 17
    assert all(len(name) < 100 for name in files_in(course_env))


# -- item: one meaning for a relative COURSE_ARTIFACTS ---------------------------------


WHERE = """\
from course import artifacts
(artifacts.artifacts_dir() / "written-here.txt").write_text("notebook 01")
print(artifacts.artifacts_dir())"""


def test_a_relative_course_artifacts_counts_from_the_course_folder(tmp_path, monkeypatch, capsys):
    """run_course.py started from another folder uses the notebooks' artifacts folder."""
    course = tmp_path / "course"
    course.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(WHERE)]
    nbformat.write(nb, course / "01_where.ipynb")
    wanted = tmp_path / "runs"
    relative = os.path.relpath(wanted, settings.ROOT)  # "../../tmp/.../runs"
    elsewhere = tmp_path.joinpath(*["elsewhere"] * (len(settings.ROOT.parts) - 1))
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # the same relative path from here lands elsewhere
    monkeypatch.setenv("COURSE_ARTIFACTS", relative)
    monkeypatch.setenv("PYTHONPATH", str(settings.ROOT))

    assert run_course.main([], root=course) == 0

    assert artifacts.artifacts_dir().resolve() == wanted  # what the notebooks and README mean
    assert (wanted / "written-here.txt").read_text() == "notebook 01"
    assert (wanted / "executed" / "01_where.ipynb").exists()
    assert f"artifacts in {wanted}" in capsys.readouterr().out
    assert files_in(elsewhere) == []


# -- item: numbers with underscores, a kernel that dies ---------------------------------


@pytest.mark.parametrize(
    ("name", "raw"), [("COURSE_LR", "1_0e-5"), ("COURSE_EPOCHS", "1_0"), ("COURSE_SEED", "1_2_3")]
)
def test_numbers_with_underscores_are_refused(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(settings.SettingError, match="without underscores") as info:
        settings.setting(name)
    assert f"{name}={raw!r}" in str(info.value)
    assert settings.check_all({name: raw}) == [str(info.value)]


def test_run_course_refuses_an_underscored_learning_rate(tmp_path, capsys):
    course = tmp_path / "course"
    course.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise SystemExit('must not run')")]
    nbformat.write(nb, course / "05_train.ipynb")
    assert run_course.main(["--lr", "1_0e-5", "--artifacts", str(tmp_path)], root=course) == 2
    printed = capsys.readouterr().out
    assert "Nothing was run" in printed and "COURSE_LR='1_0e-5'" in printed, printed
    assert "without underscores" in printed and "read it as 10e-5" in printed


def test_a_kernel_killed_for_memory_says_what_to_do(tmp_path, capsys):
    course, out = tmp_path / "course", tmp_path / "out"
    course.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("print('loading the model')"),
        nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
    ]
    nbformat.write(nb, course / "05_train.ipynb")

    assert run_course.main(["--artifacts", str(out)], root=course) == 1

    printed = capsys.readouterr().out
    assert "05_train.ipynb failed in cell 1 (counting from 0): import os, signal" in printed
    assert "DeadKernelError" in printed
    assert "The Python kernel died while running this cell (it was killed: SIGKILL)" in printed
    assert "ran out of memory" in printed
    assert "--model gpt2-small" in printed and "--batch-size 4" in printed
    assert "python run_course.py --from 05" in printed
