"""The LLM judge: an Ollama server asked over HTTP, robustly, and resumable scoring.

`helpers.query_model` and `helpers.generate_model_scores` are the book's listings
7.10 and 7.11. This module does the same for the course, hardened: it finds the
server at OLLAMA_HOST as Ollama itself does, checks that the judge model is pulled
(and says what to run when not), bounds how long it waits and how much it reads,
retries failed connections, and keeps every entry's prompt, raw reply and score in
a scores file, so an interrupted scoring run continues where it stopped.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

import helpers
from course.artifacts import read_json, write_json
from course.scores import score_summary

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
    """
    text = (host or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT_HOST).strip().rstrip("/")
    default_port = 11434
    if "://" not in text:
        text = "http://" + text
    elif text.startswith("https://"):
        default_port = 443
    elif text.startswith("http://"):
        default_port = 80
    parts = urllib.parse.urlsplit(text)
    hostname = parts.hostname or "localhost"
    if hostname in ("0.0.0.0", "::"):  # "listen everywhere" for the server: connect locally
        hostname = "localhost"
    if ":" in hostname:
        hostname = f"[{hostname}]"  # IPv6 address
    return f"{parts.scheme}://{hostname}:{parts.port or default_port}{parts.path}"


def ollama_urlopen(request: str | urllib.request.Request, timeout: float):
    """urlopen, but straight to a server on this machine even when a proxy is set."""
    url = request if isinstance(request, str) else request.full_url
    if urllib.parse.urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return opener.open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)


def ollama_get(host: str, path: str, timeout: float = 10) -> Any:
    """GET `host + path` from an Ollama server and decode the JSON answer."""
    with ollama_urlopen(host + path, timeout) as response:
        body = response.read(MAX_STATUS_BYTES + 1)
    if len(body) > MAX_STATUS_BYTES:
        raise ValueError(f"the answer to {path} is larger than {MAX_STATUS_BYTES} bytes")
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
    when no server answers or the model is missing.
    """
    host = ollama_host(host)
    try:
        version = ollama_get(host, "/api/version", timeout)["version"]
        tags = ollama_get(host, "/api/tags", timeout)
    except urllib.error.HTTPError as exc:
        raise JudgeError(
            f"Something answers at {host}, but not like an Ollama server (HTTP {exc.code} "
            "for /api/version). Check OLLAMA_HOST: it must point at Ollama's port "
            "(11434 unless you changed it)."
        ) from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JudgeError(
            f"No Ollama server answers at {host} ({reason}).\n"
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

    Stops with a JudgeError when the answer grows past MAX_REPLY_BYTES or the clock
    passes `deadline` (a time.monotonic() value): a judge that trickles bytes forever
    is no judge.
    """
    reply, received = "", 0
    with ollama_urlopen(request, timeout) as response:
        while True:
            raw_line = response.readline(MAX_REPLY_BYTES + 1)
            if not raw_line:
                break
            received += len(raw_line)
            if received > MAX_REPLY_BYTES:
                raise JudgeError(
                    f"The judge's answer is longer than {MAX_REPLY_BYTES} bytes: that is no "
                    "score. Is OLLAMA_HOST an Ollama server?"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("timed out: the whole answer took longer than the time allowed")
            line = raw_line.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                chunk = json.loads(line)
            except json.JSONDecodeError:
                raise JudgeError(
                    f"The judge sent a line that is not JSON: {line[:200]!r}"
                ) from None
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
            reply += content if isinstance(content, str) else ""
            if chunk.get("done"):
                return reply
    raise ConnectionError("the answer stream ended before its final chunk")


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
    with seed 123, temperature 0 and a 2,048-token context. More robust: at most
    `timeout` seconds of silence, up to `retries` more attempts (after waiting
    `backoff`, 2 x `backoff`, ... seconds) when the connection fails or the server
    answers 5xx, and a JudgeError that says what went wrong otherwise. However the
    server behaves, one call returns or fails within `max_seconds` (10 minutes by
    default) and reads at most MAX_REPLY_BYTES of answer.
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
                break
            time.sleep(wait)
        request = urllib.request.Request(
            url, data=payload, method="POST", headers={"Content-Type": "application/json"}
        )
        attempts += 1
        try:
            remaining = max(1.0, deadline - time.monotonic())
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
        else f"It did not answer in time (at most {timeout} s of silence, {max_seconds} s in "
        "all): on a CPU-only machine a large judge is slow, so allow more, e.g. "
        "query_model(..., timeout=900, max_seconds=1800), or choose a smaller judge."
    )
    raise JudgeError(
        f"No answer from the Ollama server at {url} after {attempts} attempt(s) "
        f"(last: {problem}). {hint}"
    )


def generate_model_scores(
    json_data: list[dict],
    json_key: str,
    model: str = "llama3",
    scores_path: str | Path | None = None,
    run: int = 0,
    url: str | None = None,
    save_every: int = 1,
    **query_kwargs,
) -> list[int]:
    """Ask the judge to score the response under `json_key` of every entry (the book's).

    Returns the scores it could read, like the book. With `scores_path`, every entry's
    prompt, raw reply and score are kept in that JSON file (written after every
    `save_every` entries) with the judge's model, digest, Ollama version and options,
    and an interrupted scoring resumes: entries already answered for the same prompt
    are not asked again. `run` numbers repeated scorings of the same responses; run r
    asks with seed 123 + r (see `judge_options`) and the file keeps the options and
    Ollama version of each run.
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
            record = read_json(scores_path)
            if record.get("judge") != judge or record.get("json_key") != json_key:
                backup = scores_path.with_name(scores_path.stem + ".previous.json")
                old_judge = record.get("judge") or {}
                print(
                    f"{scores_path.name} holds scores of another judge or response key "
                    f"({old_judge.get('tag')} {str(old_judge.get('digest'))[:12]}, "
                    f"options {old_judge.get('options')}, key {record.get('json_key')!r}): "
                    f"starting anew (the old file is kept as {backup.name})."
                )
                os.replace(scores_path, backup)
                record = None
        if record is None:
            record = {"judge": judge, "json_key": json_key, "runs": []}
        runs = [r for r in record["runs"] if r["run"] == run]
        asked_as = {"ollama_version": status["ollama_version"], "options": run_options}
        if runs and any(runs[0].get(key) != value for key, value in asked_as.items()):
            print(
                f"Run {run} in {scores_path.name} was scored with other options or another "
                f"Ollama version ({runs[0].get('options')}, {runs[0].get('ollama_version')}): "
                "scoring it anew."
            )
            record["runs"].remove(runs[0])
            runs = []
        if not runs:
            runs = [{"run": run, **asked_as, "entries": []}]
            record["runs"].append(runs[0])
            record["runs"].sort(key=lambda r: r["run"])
        this_run = runs[0]
        saved = {e["index"]: e for e in this_run["entries"]}

    entries, scores, asked, reused = [], [], 0, 0
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
            if result["score"] is None:
                tqdm.write(f"Could not convert score: {reply!r}")
        entries.append(result)
        if result["score"] is not None:
            scores.append(result["score"])
        if record is not None and result is not old and asked % save_every == 0:
            this_run["entries"] = entries + [e for i, e in saved.items() if i > index]
            write_json(scores_path, record)
    if record is not None:
        this_run["entries"] = entries
        this_run["summary"] = score_summary([e["score"] for e in entries])
        averages = [r["summary"]["average"] for r in record["runs"] if "summary" in r]
        record["summary"] = {
            "runs": len(averages),
            "run_averages": averages,
            "average": float(np.mean(averages)),
            "std": float(np.std(averages, ddof=1)) if len(averages) > 1 else None,
        }
        write_json(scores_path, record)
        if reused:
            print(f"{reused} of {len(json_data)} entries were already scored in {scores_path.name}")
    return scores
