"""The judge's HTTP client: an Ollama server found as Ollama finds it, asked for its
status and for chat answers within time and size limits, its failures explained.
Used by `course.judge` (notebook 09), notebook 11's Ollama check and run_course.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from course.bounded_http import Deadlines, bounded_opener, is_local, open_until, read_bounded

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
    if is_local(url):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return opener.open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)


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
    deadlines = Deadlines(max_seconds=max_seconds)
    previous = urllib.request._opener  # what urlopen used before the block
    urllib.request.install_opener(bounded_opener(deadlines, timeout, direct=is_local(where)))
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
