"""The LLM judge: an Ollama server asked over HTTP, robustly, and resumable scoring.

`helpers.query_model` and `helpers.generate_model_scores` are the book's listings
7.10 and 7.11. This module does the same for the course, hardened: it finds the
server at OLLAMA_HOST as Ollama itself does, checks that the judge model is pulled
(and says what to run when not), bounds how long it waits (by default 2 minutes for
each piece of an answer, 10 minutes per answer in all) and how much it reads (1 MB),
retries failed connections, and keeps every entry's prompt, raw reply and score in
a scores file (one per judge model), so an interrupted scoring run continues where
it stopped. A score is an integer from 0 to 100; any other reply is no score.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

import helpers
from course.artifacts import WRITTEN_BY, ArtifactError, read_json, write_json
from course.scores import prompts_sha256, responses_key, score_summary

OLLAMA_DEFAULT_HOST = "http://localhost:11434"
JUDGE_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the book's
MAX_REPLY_BYTES = 1 << 20  # a judge's answer is a number: more than 1 MB is no answer
MAX_STATUS_BYTES = 1 << 20  # /api/version and /api/tags are small JSON objects


class JudgeError(RuntimeError):
    """The LLM judge (an Ollama server) could not answer; the message says what to do."""


def ollama_host(host: str | None = None) -> str:
    """The judge's base URL: `host`, else OLLAMA_HOST, else http://localhost:11434.

    Reads OLLAMA_HOST the way Ollama does: "localhost", "0.0.0.0:11435" and
    "http://gpu-box:11434" all work; without a scheme the port defaults to 11434.
    A value that is no address ("localhost:abc", a port above 65535, "ftp://...")
    raises a JudgeError naming the variable and showing what works.
    """
    given = host or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT_HOST
    source = f"The address {given!r}" if host else f"OLLAMA_HOST={given!r}"
    text = given.strip().rstrip("/")
    default_port = 11434
    if "://" not in text:
        text = "http://" + text
    elif text.startswith("https://"):
        default_port = 443
    elif text.startswith("http://"):
        default_port = 80
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
        if parts.scheme not in ("http", "https") or any(c.isspace() for c in text):
            raise ValueError(f"{parts.scheme!r} is not http or https")
    except ValueError as exc:
        raise JudgeError(
            f"{source} is not an address of an Ollama server ({exc}). Use a "
            "host and port such as localhost:11434 or http://192.168.1.20:11434, or unset "
            "OLLAMA_HOST for the default http://localhost:11434."
        ) from None
    hostname = parts.hostname or "localhost"
    if hostname in ("0.0.0.0", "::"):  # "listen everywhere" for the server: connect locally
        hostname = "localhost"
    if ":" in hostname:
        hostname = f"[{hostname}]"  # IPv6 address
    return f"{parts.scheme}://{hostname}:{port or default_port}{parts.path}"


def ollama_urlopen(request: str | urllib.request.Request, timeout: float):
    """urlopen, but straight to a server on this machine even when a proxy is set."""
    url = request if isinstance(request, str) else request.full_url
    if urllib.parse.urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return opener.open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)


class _Deadlines:
    """Closes the connections of requests whose time is up, wherever they are waiting.

    A socket timeout bounds each wait for data, not the whole answer: a server that
    sends its headers or body one byte at a time, each within the timeout, could keep
    a request alive for ever. Each connection made through `_bounded_opener` gets a
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


def _bounded_opener(deadlines: _Deadlines, piece_timeout: float, direct: bool):
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


def _is_local(url: str) -> bool:
    return urllib.parse.urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1")


@contextlib.contextmanager
def open_until(request: str | urllib.request.Request, timeout: float, deadline: float):
    """Open `request` (as `ollama_urlopen`), all of it over by `deadline`.

    `deadline` is a time.monotonic() value that covers connecting, the headers and the
    body read inside the `with` block; each wait for data lasts at most `timeout`
    seconds. Passing the deadline anywhere raises TimeoutError.
    """
    url = request if isinstance(request, str) else request.full_url
    deadlines = _Deadlines(deadline)
    opener = _bounded_opener(deadlines, timeout, direct=_is_local(url))
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


def ollama_get(host: str, path: str, timeout: float = 10) -> Any:
    """GET `host + path` from an Ollama server and decode the JSON answer.

    Reads at most MAX_STATUS_BYTES and waits at most `timeout` seconds in all
    (connecting, headers and body): an answer that is larger, or slower, raises
    ValueError or TimeoutError.
    """
    deadline = time.monotonic() + timeout
    with open_until(host + path, timeout, deadline) as response:
        body = b"".join(read_bounded(response, MAX_STATUS_BYTES, deadline, timeout))
    return json.loads(body.decode("utf-8"))


def find_ollama_model(tags: dict, model: str) -> dict | None:
    """The entry of Ollama's /api/tags list for `model` ("llama3" means "llama3:latest")."""
    wanted = {model} if ":" in model else {model, model + ":latest"}
    for entry in tags.get("models", []):
        if entry.get("name") in wanted or entry.get("model") in wanted:
            return entry
    return None


def ollama_status(model: str = "llama3", host: str | None = None, timeout: float = 10) -> dict:
    """Ask the Ollama server over HTTP for its version and whether `model` is pulled.

    Returns the judge's description that the scores file records (model, tag,
    digest, Ollama version, options). Raises JudgeError saying exactly what to run
    when no server answers or the model is missing. Each of its two requests waits at
    most `timeout` seconds (10) in all and reads at most MAX_STATUS_BYTES (1 MB).
    """
    host = ollama_host(host)
    path = "/api/version"
    try:
        version = ollama_get(host, path, timeout)["version"]
        path = "/api/tags"
        tags = ollama_get(host, path, timeout)
        if not isinstance(tags, dict) or not isinstance(tags.get("models"), list):
            raise ValueError("no list of models")
    except urllib.error.HTTPError as exc:
        raise JudgeError(
            f"Something answers at {host}, but not like an Ollama server (HTTP {exc.code} "
            f"for {path}). Check OLLAMA_HOST: it must point at Ollama's port "
            "(11434 unless you changed it)."
        ) from None
    except (ValueError, KeyError, TypeError) as exc:  # too long, not JSON, wrong fields
        raise JudgeError(
            f"Something answers at {host}, but not like an Ollama server: its answer to "
            f"{path} is not Ollama's ({type(exc).__name__}: {exc}). Check OLLAMA_HOST: it "
            "must point at Ollama's port (11434 unless you changed it)."
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise JudgeError(
            f"No Ollama server answers at {host} ({reason}; waited at most {timeout:g} s).\n"
            "- Start it: run `ollama serve` in a terminal (or open the Ollama app), then "
            "run this cell again. Not installed? See https://ollama.com/download.\n"
            "- Running on another port, another machine or in Docker? Point the course at "
            "it with OLLAMA_HOST, e.g. `OLLAMA_HOST=http://localhost:11435 jupyter lab`, or "
            'os.environ["OLLAMA_HOST"] = "http://192.168.1.20:11434" in a cell above. '
            "In Docker publish the port: `docker run -d -p 11434:11434 ollama/ollama`."
        ) from None
    found = find_ollama_model(tags, model)
    if found is None:
        have = ", ".join(str(m.get("name")) for m in tags.get("models", [])) or "none"
        raise JudgeError(
            f"The Ollama server at {host} (version {version}) runs, but the judge model "
            f"{model!r} is not pulled (it has: {have}).\n"
            f"Pull it: run `ollama pull {model}` in a terminal (llama3 is about 4.7 GB; in "
            f"Docker: `docker exec -it ollama ollama pull {model}`), then run this cell again."
        )
    return {
        "model": model,
        "tag": found.get("name"),
        "digest": found.get("digest"),
        "options": dict(JUDGE_OPTIONS),
        "ollama_version": version,
        "details": found.get("details", {}),
    }


# the digest the tests' stand-in server reports for its "model" (tests/ollama_standin.py):
# the SHA-256 of "course stand-in judge", the digest of no real model
STANDIN_DIGEST = "fab175d0426aab9e42bb2f500bbbe4bb94f2a1bd5de4b908e1ba6574bf592dd5"


def is_standin(judge: dict) -> bool:
    """True when the judge (`ollama_status`'s answer) is the tests' stand-in, not a model."""
    return judge.get("digest") == STANDIN_DIGEST


def judge_label(judge: dict) -> str:
    """How figures and printed lines name the judge: its tag, or the stand-in as such."""
    if is_standin(judge):
        return f"the tests' stand-in for {judge.get('tag')}, word overlap, not a language model"
    return str(judge.get("tag") or judge.get("model"))


def judge_options(run: int = 0, options: dict | None = None) -> dict:
    """The judge's options for scoring run `run`: the book's (or `options`) with seed + run.

    Run 0 sends exactly the book's request (seed 123). At temperature 0 the judge always
    takes the most likely token and the seed changes nothing; with a temperature above 0
    the seeds make the runs independent samples instead of copies of one another.
    """
    chosen = dict(JUDGE_OPTIONS if options is None else options)
    if "seed" in chosen:
        chosen["seed"] = chosen["seed"] + run
    return chosen


def read_chat_stream(request: urllib.request.Request, timeout: float, deadline: float) -> str:
    """Send a streaming /api/chat request and join the content of its NDJSON chunks.

    Waits at most `timeout` seconds for each piece of the answer, reads at most
    MAX_REPLY_BYTES (1 MB) and stops when the clock passes `deadline` (a
    time.monotonic() value): a judge that trickles bytes forever, or answers without
    end, is no judge. Too long an answer raises JudgeError, too slow a TimeoutError.
    """
    reply, buffer = "", b""
    with open_until(request, timeout, deadline) as response:
        try:
            for piece in read_bounded(response, MAX_REPLY_BYTES, deadline, timeout):
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                for raw_line in lines:
                    content, done = _chat_chunk(raw_line)
                    reply += content
                    if done:
                        return reply
        except ValueError:
            raise JudgeError(
                f"The judge's answer is longer than {MAX_REPLY_BYTES:,} bytes: that is no "
                "score. Is OLLAMA_HOST an Ollama server?"
            ) from None
    if buffer.strip():
        content, done = _chat_chunk(buffer)
        if done:
            return reply + content
    raise ConnectionError("the answer stream ended before its final chunk")


def _chat_chunk(raw_line: bytes) -> tuple[str, bool]:
    """The content of one NDJSON line of Ollama's chat stream, and whether it is the last."""
    line = raw_line.decode("utf-8", errors="replace").strip()
    if not line:
        return "", False
    try:
        chunk = json.loads(line)
    except json.JSONDecodeError:
        raise JudgeError(f"The judge sent a line that is not JSON: {line[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise JudgeError(f"The judge sent {line[:200]!r}, not an Ollama chat chunk.")
    if "error" in chunk:  # Ollama reports failures inside a 200 stream like this
        raise JudgeError(
            f"The Ollama server failed while answering: {chunk['error']}\n"
            "Look at the server's log (the terminal running `ollama serve`); a model "
            "that does not fit in memory fails like this: try a smaller judge model."
        )
    message = chunk.get("message")
    content = message.get("content", "") if isinstance(message, dict) else ""
    return (content if isinstance(content, str) else ""), bool(chunk.get("done"))


def query_model(
    prompt: str,
    model: str = "llama3",
    url: str | None = None,
    options: dict | None = None,
    timeout: float = 120,
    retries: int = 2,
    backoff: float = 1.0,
    max_seconds: float = 600,
) -> str:
    """Send `prompt` to Ollama's chat API and return the reply (the book's function).

    As the book: streaming /api/chat at `url` (default: OLLAMA_HOST + "/api/chat")
    with seed 123, temperature 0 and a 2,048-token context. More robust: it waits at
    most `timeout` seconds (2 minutes) for each piece of the answer, tries up to
    `retries` (2) more times (after waiting `backoff`, 2 x `backoff`, ... seconds)
    when the connection fails or the server answers 5xx, and raises a JudgeError that
    says what went wrong otherwise. However the server behaves, one call returns or
    fails within `max_seconds` (10 minutes) and reads at most MAX_REPLY_BYTES (1 MB).
    """
    deadline = time.monotonic() + max_seconds
    url = url or f"{ollama_host()}/api/chat"
    data = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": dict(JUDGE_OPTIONS if options is None else options),
    }
    payload = json.dumps(data).encode("utf-8")
    problem, attempts = "no attempt made", 0
    for attempt in range(retries + 1):
        if attempt > 0:
            wait = backoff * 2 ** (attempt - 1)
            if time.monotonic() + wait >= deadline:
                break  # no time left for another attempt
            time.sleep(wait)
        request = urllib.request.Request(
            url, data=payload, method="POST", headers={"Content-Type": "application/json"}
        )
        attempts += 1
        try:
            remaining = max(0.05, deadline - time.monotonic())
            return read_chat_stream(request, min(timeout, remaining), deadline)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read(MAX_STATUS_BYTES).decode("utf-8"))["error"]
            except (ValueError, KeyError, TypeError, OSError):
                message = exc.reason
            if exc.code == 404 and "not found" in str(message) and "model" in str(message):
                raise JudgeError(
                    f"The Ollama server at {url} says: {message}. Pull the judge model: run "
                    f"`ollama pull {model}` in a terminal, then run this cell again."
                ) from None
            if exc.code < 500:
                raise JudgeError(
                    f"The Ollama server at {url} refused the request: HTTP {exc.code}: {message}"
                ) from None
            problem = f"HTTP {exc.code}: {message}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    hint = (
        "Is the server running? Check with course.judge.ollama_status()."
        if "timed out" not in problem
        else f"It did not answer in time (it waits at most {timeout:g} s for each piece of "
        f"the answer and {max_seconds:g} s in all): on a CPU-only machine a large judge is "
        "slow, so allow more, e.g. query_model(..., timeout=900, max_seconds=1800), or "
        "choose a smaller judge."
    )
    raise JudgeError(
        f"No answer from the Ollama server at {url} after {attempts} "
        f"attempt{'s' if attempts != 1 else ''} (last: {problem}). {hint}"
    )


@contextlib.contextmanager
def bounded(timeout: float = 120, max_seconds: float = 600, url: str | None = None):
    """Run the book's `helpers.query_model` (or any urllib call) within the judge's limits.

        with course_judge.bounded():
            print(helpers.query_model("What do Llamas eat?", JUDGE_MODEL, url=judge_url))

    Inside the block every HTTP request waits at most `timeout` seconds (2 minutes) for
    each piece of data and `max_seconds` (10 minutes) in all, connecting and headers
    included, so a judge that trickles its answer cannot hold the cell for ever. What
    goes wrong ends as a JudgeError that says what happened and what to do, not as a
    raw HTTPError, ConnectionResetError or JSONDecodeError. The book's code runs as it
    is written: the limits come from the opener urllib uses during the block.
    """
    where = url or f"{ollama_host()}/api/chat"
    deadlines = _Deadlines(max_seconds=max_seconds)
    previous = urllib.request._opener  # what urlopen used before the block
    urllib.request.install_opener(_bounded_opener(deadlines, timeout, direct=_is_local(where)))
    try:
        yield
    except JudgeError:
        raise
    except Exception as exc:
        raise _judge_error(exc, where, deadlines.expired, timeout, max_seconds) from None
    finally:
        urllib.request.install_opener(previous)
        deadlines.cancel()


def _judge_error(
    exc: Exception, url: str, expired: bool, timeout: float, max_seconds: float
) -> JudgeError:
    """A JudgeError for a failure of the book's query_model: what happened, what to do."""
    check = (
        "Check the server with course.judge.ollama_status(JUDGE_MODEL), then run the cell again."
    )
    if expired or isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return JudgeError(
            f"The judge at {url} did not answer in time: the course waits at most "
            f"{timeout:g} s for each piece of an answer and {max_seconds:g} s in all. A "
            "large judge on a CPU-only machine is slow: choose a smaller one (e.g. "
            "COURSE_JUDGE_MODEL=phi3), or allow more with "
            "course_judge.bounded(timeout=900, max_seconds=1800). Is the server stuck? "
            "Restart `ollama serve`."
        )
    if isinstance(exc, urllib.error.HTTPError):
        try:
            message = json.loads(exc.read(MAX_STATUS_BYTES).decode("utf-8"))["error"]
        except (ValueError, KeyError, TypeError, OSError):
            message = exc.reason
        if exc.code == 404 and "model" in str(message):
            return JudgeError(
                f"The Ollama server at {url} says: {message}. Pull the judge model with "
                "`ollama pull <model>` in a terminal, then run the cell again."
            )
        what = "failed" if exc.code >= 500 else "refused the request"
        return JudgeError(
            f"The Ollama server at {url} {what}: HTTP {exc.code}: {message}. Look at the "
            f"server's log (the terminal running `ollama serve`). {check}"
        )
    if isinstance(exc, (ValueError, KeyError, TypeError, UnicodeDecodeError)):
        return JudgeError(
            f"Something answers at {url}, but not like Ollama's chat API ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Check OLLAMA_HOST: it must point at Ollama's port (11434 "
            f"unless you changed it). {check}"
        )
    if isinstance(exc, (OSError, http.client.HTTPException)):
        reason = getattr(exc, "reason", exc)
        return JudgeError(
            f"The connection to the judge at {url} failed ({type(exc).__name__}: {reason}). "
            f"Is the server running? Start it with `ollama serve`. {check}"
        )
    if isinstance(exc, RuntimeError):  # the book's function reports Ollama's own errors so
        return JudgeError(f"{exc}. {check}")
    return JudgeError(f"The judge at {url} could not answer ({type(exc).__name__}: {exc}). {check}")


def keep_backup(path: str | Path) -> Path:
    """Copy `path` to backups/<name>.<n><suffix> beside it, n the first number not taken.

    A backup is never overwritten, and backups live in their own folder, so they are
    never mistaken for a judge's scores file. Returns the backup's path (relative to
    the file's folder, for messages).
    """
    path = Path(path)
    folder = path.parent / "backups"
    try:
        folder.mkdir(exist_ok=True)
        data = path.read_bytes()
        number = 1
        while True:
            backup = folder / f"{path.stem}.{number}{path.suffix}"
            try:
                with open(backup, "xb") as f:  # "x": fails if it exists, so never overwrites
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                return backup.relative_to(path.parent)
            except FileExistsError:
                number += 1
    except OSError as exc:
        raise ArtifactError(
            f"Could not keep a backup of {path.name} in {folder} ({exc.strerror}); nothing "
            "was changed. Free some space or make the folder writable, then run the cell again."
        ) from None


def generate_model_scores(
    json_data: list[dict],
    json_key: str,
    model: str = "llama3",
    scores_path: str | Path | None = None,
    run: int = 0,
    url: str | None = None,
    save_seconds: float = 5.0,
    **query_kwargs,
) -> list[int]:
    """Ask the judge to score the response under `json_key` of every entry (the book's).

    Returns the scores it could read, like the book: a score is an integer from 0 to
    100 (`helpers.parse_score`); any other reply is no score, and is counted as such.
    With `scores_path` (one file per judge model: `course.artifacts.scores_path`),
    every entry's prompt, raw reply and score are kept in that JSON file with the
    judge's model, digest, Ollama version and options. It is written every
    `save_seconds` (5), at the end, and when the scoring is interrupted or fails, and
    a scoring run that stopped resumes: entries already answered for the same prompt
    are not asked again. If the file holds scores made otherwise (another digest of
    the model, other options, another response key, another Ollama version for this
    run), it is first copied to a numbered backup (backups/ beside it) that is never
    overwritten. `run` numbers repeated scorings of the same responses; run r asks
    with seed 123 + r (see `judge_options`).

    Each entry is one `query_model` call: it waits at most 2 minutes for each piece
    of the answer and 10 minutes in all (pass `timeout=` and `max_seconds=` to change
    that), so a judge that hangs stops the scoring with a JudgeError within about 10
    minutes; what was scored is kept.
    """
    from tqdm import tqdm

    missing = [i for i, entry in enumerate(json_data) if json_key not in entry]
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(json_data)} entries (the first: entry {missing[0]}) have "
            f"no {json_key!r} to score. Responses come from notebook 07_extracting_responses: "
            'run it first, and pass the key its file uses ("model_response").'
        )
    url = url or f"{ollama_host()}/api/chat"
    options = query_kwargs.get("options")
    base_options = dict(JUDGE_OPTIONS if options is None else options)
    run_options = judge_options(run, base_options)
    query_kwargs["options"] = run_options
    record, saved = None, {}
    if scores_path is not None:
        scores_path = Path(scores_path)
        status = ollama_status(model, url.split("/api/")[0])
        judge = {key: status[key] for key in ("model", "tag", "digest", "details")}
        judge["options"] = base_options
        if scores_path.exists():
            record = read_json(scores_path, WRITTEN_BY["scores"])
            if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
                backup = keep_backup(scores_path)
                print(
                    f"{scores_path.name} is not a scores file: starting anew (the old file "
                    f"is kept as {backup})."
                )
                record = None
            elif record.get("judge") != judge or record.get("json_key") != json_key:
                old_judge = record.get("judge") or {}
                backup = keep_backup(scores_path)
                print(
                    f"{scores_path.name} holds scores of another judge or response key "
                    f"({old_judge.get('tag')} {str(old_judge.get('digest'))[:12]}, "
                    f"options {old_judge.get('options')}, key {record.get('json_key')!r}): "
                    f"starting anew (the old file is kept as {backup})."
                )
                record = None
        if record is None:
            record = {"judge": judge, "json_key": json_key, "runs": []}
        key = prompts_sha256([helpers.judge_prompt(entry, json_key) for entry in json_data])
        stale = [
            r for r in record["runs"] if r["run"] != run and responses_key(r) not in (None, key)
        ]
        if stale:
            backup = keep_backup(scores_path)
            numbers = ", ".join(str(r["run"]) for r in stale)
            print(
                f"Run{'s' if len(stale) > 1 else ''} {numbers} in {scores_path.name} scored other "
                "responses than these (notebook 07 made them anew since), so they are not "
                f"averaged with these: set aside (the old file is kept as {backup}). Score "
                "these responses as many times as you want averaged with COURSE_JUDGE_RUNS."
            )
            record["runs"] = [r for r in record["runs"] if r not in stale]
        runs = [r for r in record["runs"] if r["run"] == run]
        asked_as = {"ollama_version": status["ollama_version"], "options": run_options}
        if runs and any(runs[0].get(key) != value for key, value in asked_as.items()):
            backup = keep_backup(scores_path)
            print(
                f"Run {run} in {scores_path.name} was scored with other options or another "
                f"Ollama version ({runs[0].get('options')}, {runs[0].get('ollama_version')}): "
                f"scoring it anew (the old file is kept as {backup})."
            )
            record["runs"].remove(runs[0])
            runs = []
        if not runs:
            runs = [{"run": run, **asked_as, "entries": []}]
            record["runs"].append(runs[0])
            record["runs"].sort(key=lambda r: r["run"])
        this_run = runs[0]
        this_run["responses_sha256"] = key
        saved = {e["index"]: e for e in this_run["entries"]}

    def save_progress() -> None:  # what is scored so far, and what was saved beyond it
        this_run["entries"] = entries + [e for i, e in saved.items() if i >= len(entries)]
        this_run.pop("summary", None)  # unfinished again until the loop ends
        write_json(scores_path, record)

    entries, scores, asked, reused = [], [], 0, 0
    last_save, unsaved = time.monotonic(), False
    try:
        for index, entry in enumerate(tqdm(json_data, desc="Scoring entries")):
            prompt = helpers.judge_prompt(entry, json_key)
            old = saved.get(index)
            if old is not None and old["prompt"] == prompt:
                result = old
                reused += 1
            else:
                reply = query_model(prompt, model, url, **query_kwargs)
                result = {
                    "index": index,
                    "prompt": prompt,
                    "reply": reply,
                    "score": helpers.parse_score(reply),
                }
                asked += 1
                unsaved = True
                if result["score"] is None:
                    more = f"... ({len(reply):,} characters)" if len(reply) > 200 else ""
                    tqdm.write(f"Could not convert score: {reply[:200]!r}{more}")
            entries.append(result)
            if result["score"] is not None:
                scores.append(result["score"])
            if record is not None and unsaved and time.monotonic() - last_save >= save_seconds:
                save_progress()
                last_save, unsaved = time.monotonic(), False
    except BaseException:  # interrupted, or the judge failed: keep what was scored
        if record is not None and unsaved:
            save_progress()
        raise
    if record is not None:
        this_run["entries"] = entries
        this_run["summary"] = score_summary([e["score"] for e in entries])
        finished = [r for r in record["runs"] if "summary" in r]
        averages = [r["summary"]["average"] for r in finished]
        readable = [a for a in averages if a is not None]
        record["summary"] = {
            "runs": len(averages),
            "run_averages": averages,
            "responses_sha256": this_run["responses_sha256"],
            # None (JSON null), not NaN, when no reply of any run had a readable score
            "average": float(np.mean(readable)) if readable else None,
            "std": float(np.std(readable, ddof=1)) if len(readable) > 1 else None,
        }
        write_json(scores_path, record)
        if this_run["summary"]["average"] is None:
            print(
                f"No reply of the judge had a readable score in run {run} ({len(entries)} "
                f"entries): there is no average. Read the replies in {scores_path.name}; a "
                "judge that does not answer with a number needs another model "
                "(COURSE_JUDGE_MODEL) or a look at the server."
            )
        if reused:
            print(f"{reused} of {len(json_data)} entries were already scored in {scores_path.name}")
    return scores
