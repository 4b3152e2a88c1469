"""Registering an exported GGUF file with a running Ollama over its REST API (notebook 11).

The blob upload and /api/create that `ollama create` makes, every wait with a deadline,
and every unexpected answer turned into an ExportError that says what to do.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from course import artifacts, ollama_client
from course.bounded_http import open_until, read_bounded
from course.export import ExportError, ollama_parameters, template

PIECE_TIMEOUT_S = 120  # the longest wait for one piece of an answer
CHECK_MAX_S = 30  # a blob check (HEAD) in all
CREATE_MAX_S = 600  # /api/create of a large model, status lines included
UPLOAD_MAX_S = 600  # a blob upload, plus a second per MB of the file
MAX_ANSWER_BYTES = 1 << 20  # Ollama's status lines and errors are short
FILES_API_VERSION = (0, 5, 5)  # the first Ollama whose /api/create takes uploaded "files"
UPDATE_OLLAMA = (
    "Update Ollama (https://ollama.com/download), or create the model from the Modelfile "
    "that notebook 11 writes: `ollama create <name> -f <the Modelfile>` in the artifacts folder."
)


def ollama_version(host: str | None = None, timeout: float = 5) -> str | None:
    """The version of the Ollama server at `host` (OLLAMA_HOST), or None if none answers.

    None also when something else answers there (not Ollama's /api/version). An
    OLLAMA_HOST that is no address at all raises course.judge's JudgeError, which says
    what to write instead.
    """
    base_url = ollama_client.ollama_host(host)
    try:
        version = ollama_client.ollama_get(base_url, "/api/version", timeout)["version"]
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        return None  # URLError and timeouts are OSErrors; a foreign answer fails to parse
    return version if isinstance(version, str) else None


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """(0, 5, 7) for "0.5.7"; None for none, for what is no version, and for "0.0.0".

    Ollama built from source calls itself 0.0.0, so that says nothing about its age.
    """
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version or "")
    numbers = tuple(int(n) for n in match.groups()) if match else None
    return None if numbers == (0, 0, 0) else numbers


def _too_old(version: str | None) -> str:
    return (
        f"This Ollama ({version or 'version unknown'}) is older than the API the course "
        f"uses (Ollama {'.'.join(map(str, FILES_API_VERSION))} or newer creates a model from "
        f"uploaded files). {UPDATE_OLLAMA}"
    )


def _request(method, url, data=None, headers=None, max_seconds=CHECK_MAX_S, what="it"):
    """One request to Ollama: (HTTP status, body); every failure is an ExportError."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    deadline = time.monotonic() + max_seconds
    try:
        with open_until(request, PIECE_TIMEOUT_S, deadline) as response:
            body = b"".join(read_bounded(response, MAX_ANSWER_BYTES, deadline, PIECE_TIMEOUT_S))
            if time.monotonic() >= deadline:  # cut off by the deadline, not ended by Ollama
                raise TimeoutError("the answer took longer than the time allowed")
            return response.status, body
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException):
            return exc.code, b""
    except TimeoutError:
        raise ExportError(
            f"Ollama at {url} did not finish {what} within {max_seconds:g} s. It may be "
            "busy or stuck: look at its log (the terminal running `ollama serve`), restart "
            "it if need be, and run the cell again."
        ) from None
    except ValueError:
        raise ExportError(
            f"The answer from {url} to {what} is longer than {MAX_ANSWER_BYTES:,} bytes: "
            "no Ollama answers like that. Is OLLAMA_HOST an Ollama server?"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ExportError(
            f"Ollama at {url} did not answer {what} ({reason}). Is it still running? Start "
            "it again (`ollama serve`, or the Ollama app), check OLLAMA_HOST, and run the "
            "cell again."
        ) from None


def _error_of(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        found = json.loads(text)
    except ValueError:
        return text[:300]
    return str(found.get("error") or text[:300]) if isinstance(found, dict) else text[:300]


def push_blob(base_url: str, path: str | Path) -> str:
    """Upload a file to Ollama as a blob (unless it is there); return its digest.

    HEAD /api/blobs/sha256:<digest> asks whether Ollama has it (200) or not (404);
    POST /api/blobs/sha256:<digest> with the file's bytes creates it (201), and Ollama
    answers 400 when the bytes do not have that digest. The upload may take
    UPLOAD_MAX_S plus a second per MB.
    """
    path = Path(path)
    digest = "sha256:" + artifacts.sha256_of_file(path)
    url = f"{base_url}/api/blobs/{digest}"
    status, _ = _request("HEAD", url, what="whether it has the file")
    if status == 200:
        return digest
    size = path.stat().st_size
    with open(path, "rb") as f:
        status, body = _request(
            "POST",
            url,
            data=f,
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            max_seconds=UPLOAD_MAX_S + size / 1e6,
            what=f"the upload of {path.name}",
        )
    if status in (200, 201):
        return digest
    hint = f" {_too_old(None)}" if status in (404, 405) else ""
    raise ExportError(f"Ollama did not take {path.name} (HTTP {status}: {_error_of(body)}).{hint}")


def _status_lines(body: bytes, url: str, name: str) -> list[str]:
    """The status lines of /api/create's NDJSON answer; an error line stops with its message."""
    statuses = []
    for line in body.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            raise ExportError(
                f"{url} answered with {line[:120]!r}, which is not Ollama's answer. Is "
                "OLLAMA_HOST an Ollama server? If it is, update Ollama."
            )
        if "error" in item:
            raise ExportError(f"Ollama could not create {name!r}: {item['error']}")
        statuses.append(str(item.get("status", "")))
    if "success" not in statuses:
        raise ExportError(
            f"Ollama's answer to creating {name!r} ended before it said success. Look at "
            "Ollama's log (the terminal running `ollama serve`) and run the cell again."
        )
    return statuses


def create_model(
    base_url: str, name: str, files: dict[str, str], template_text: str, parameters: dict
) -> list[str]:
    """POST /api/create: a model from uploaded GGUF blobs, a template and parameters.

    Returns Ollama's status lines, which it streams as it works ("parsing GGUF", ...,
    "success"); an error stops with Ollama's message. It all takes CREATE_MAX_S at most.
    """
    body = {"model": name, "files": files, "template": template_text, "parameters": parameters}
    url = f"{base_url}/api/create"
    status, raw = _request(
        "POST",
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        max_seconds=CREATE_MAX_S,
        what=f"the creation of {name!r}",
    )
    if status != 200:
        error = _error_of(raw)
        old = status == 404 or (status in (400, 405) and "modelfile" in error.lower())
        hint = f" {_too_old(None)}" if old else ""
        raise ExportError(f"Ollama could not create {name!r} (HTTP {status}: {error}).{hint}")
    return _status_lines(raw, url, name)


def register_with_ollama(
    gguf_path: str | Path,
    name: str,
    style: str,
    context_length: int,
    host: str | None = None,
) -> list[str]:
    """Upload a GGUF file to Ollama and create model `name` with the run's template.

    The same model that `ollama create <name> -f <Modelfile>` builds. Returns Ollama's
    status lines. No Ollama, or one too old, stops before anything is uploaded.
    """
    base_url = ollama_client.ollama_host(host)
    version = ollama_version(base_url)
    if version is None:
        raise ExportError(
            f"No Ollama answers at {base_url}. Start it (`ollama serve`, or the Ollama "
            "app), check OLLAMA_HOST, and run the cell again."
        )
    numbers = version_tuple(version)
    if numbers is not None and numbers < FILES_API_VERSION:
        raise ExportError(_too_old(version))
    digest = push_blob(base_url, gguf_path)
    return create_model(
        base_url,
        name,
        {Path(gguf_path).name: digest},
        template(style),
        ollama_parameters(style, context_length),
    )


def ollama_model_name(stem: str) -> str:
    """A name Ollama accepts for the exported model: lower case, e.g. "gpt2-medium355m-sft"."""
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "course-model"
