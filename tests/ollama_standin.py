"""A stand-in for an Ollama server, speaking Ollama's REST protocol on the loopback.

It serves what the course uses of Ollama's API, as Ollama sends it:

- `GET /` -> "Ollama is running"; `GET /api/version` -> {"version": ...};
  `GET /api/tags` -> {"models": [{name, model, modified_at, size, digest, details}]}
- `POST /api/chat` -> NDJSON chunks {"model", "created_at", "message": {"role":
  "assistant", "content"}, "done": false}, then a final chunk with "done": true,
  "done_reason" and the timing counts; with "stream": false, one JSON object.
  An unknown model gets 404 {"error": "model '...' not found"}.
- `HEAD /api/blobs/sha256:<digest>` -> 200 if the stand-in holds that blob, else 404;
  `POST /api/blobs/sha256:<digest>` with a file's bytes -> 201 Created when their
  SHA-256 is the digest (200 when the blob is already there), 400 {"error": "digest
  mismatch, expected ..., got ..."} when it is not; a digest that is not "sha256:"
  and 64 hex digits gets 400 {"error": "invalid digest format"}.
- `POST /api/create` {"model", "files": {name: digest}, "template", "parameters",
  "system", "stream"} -> NDJSON status lines ("parsing GGUF", "using existing layer
  sha256:...", ..., "writing manifest", "success"), or with "stream": false the last
  one. A file whose blob was not pushed, a blob that is not GGUF, an invalid model
  name, an unknown parameter or neither "from" nor "files" get an error as Ollama
  gives it. The new model joins /api/tags; asked on /api/chat it answers a fixed
  sentence (`CREATED_MODEL_REPLY`): the stand-in runs no model.

Instead of a language model it scores deterministically: when the prompt is the
book's judge prompt ("Given the input `...` and correct output `...`, score the
model response `...`"), the reply is round(100 x F1) of the word overlap between
the model response and the correct output. Other prompts get a fixed sentence. Its
model's digest is the SHA-256 of "course stand-in judge", the digest of no real model.
The course treats it like any Ollama server (the tests set COURSE_JUDGE_RUNS=1).

It also answers the two prompts of notebook 12 (`course.judge_check`): a pairwise
prompt (two answers, A and B, and the correct output) with MT-Bench's verdict format,
`[[A]]`, `[[B]]` or `[[C]]` for a tie (the answer with the larger word overlap wins;
equal overlaps tie), and the 1-5 rubric prompt (1 + round(4 x overlap)). `bias`
(or `set_bias`) makes it a judge with a known flaw, for tests that must catch it:
"first" always prefers the answer shown first ("[[A]]"); "length" prefers the longer
answer and scores by length alone (0-100 and 1-5 rise with the number of words).

A real judge's scores vary a little between runs; `noise=n` (or `set_noise(n)`) makes
the stand-in's do too, reproducibly: the score moves by `noise_offset(seed, prompt, n)`,
an offset from -n to n taken from the SHA-256 of the request's `options.seed` and the
prompt, and is kept within 0-100. The same request always gets the same answer; the
same prompt with another seed (another scoring run) usually another one.

Tests switch on faults with `set_fault`, each as a misbehaving server shows it:

- "error-mid-stream": an {"error": ...} line after part of the answer;
- "http-500": a 500 answer; "disconnect": the connection closes without an answer;
- "slow": waits `delay` seconds before answering;
- "no-number": a reply with no score in it;
- "huge-reply": a reply of `size` digits (default 5,000: more than Python's int()
  converts), streamed in the usual chunks;
- "trickle": /api/chat answers 200 and then sends its chunks one byte at a time,
  `delay` seconds apart, forever (an answer without end);
- "endless-version": GET /api/version answers 200 and streams `{"version": "0.`
  followed by digits forever, `size` bytes (default 64 KiB) every `delay` seconds.

Each applies to the next `times` requests of its endpoint (None: all of them).
`sent_bytes` counts what the endless faults sent. Run it by hand with
`python tests/ollama_standin.py --port 11434`.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import re
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.0.0"  # not a real release: a stored notebook shows the stand-in answered
MODELS = [
    {
        "name": "llama3:latest",
        "model": "llama3:latest",
        "modified_at": "2024-05-20T10:11:12.123456789+02:00",
        "size": 4661224676,
        # the SHA-256 of "course stand-in judge": not the digest of any real model
        "digest": hashlib.sha256(b"course stand-in judge").hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "8.0B",
            "quantization_level": "Q4_0",
        },
    }
]
# fault -> the endpoint it affects
FAULTS = {
    "error-mid-stream": "chat",
    "http-500": "chat",
    "disconnect": "chat",
    "slow": "chat",
    "no-number": "chat",
    "huge-reply": "chat",
    "trickle": "chat",
    "endless-version": "version",
}
HUGE_REPLY_DIGITS = 5000
NO_NUMBER_REPLY = "I cannot rate this response without more context."
OTHER_PROMPT_REPLY = "I am a stand-in for a language model and only score responses."
CREATED_MODEL_REPLY = "I am the Ollama stand-in: I store models but run none of them."
_DIGEST = re.compile(r"sha256[:-][0-9a-f]{64}")
# the Modelfile's PARAMETER names that Ollama accepts (its Modelfile reference)
PARAMETERS = {
    "num_ctx": int,
    "repeat_last_n": int,
    "repeat_penalty": float,
    "temperature": float,
    "seed": int,
    "stop": list,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
}

_JUDGE_PROMPT = re.compile(
    r"Given the input `(?P<input>.*)` and correct output `(?P<output>.*)`, "
    r"score the model response `(?P<response>.*)` on a scale from 0 to 100",
    re.DOTALL,
)


_RUBRIC_PROMPT = re.compile(
    r"Given the input `(?P<input>.*)` and correct output `(?P<output>.*)`, "
    r"rate the model response `(?P<response>.*)` on this scale",
    re.DOTALL,
)
_PAIRWISE_PROMPT = re.compile(
    r"\[Correct output\]\n(?P<output>.*)\n\[The start of answer A\]\n(?P<a>.*)\n"
    r"\[The end of answer A\]\n\[The start of answer B\]\n(?P<b>.*)\n\[The end of answer B\]",
    re.DOTALL,
)
BIASES = ("first", "length")


def overlap_f1(response: str, reference: str) -> float:
    """F1 of the words (lower case, letters and digits) shared by two texts."""
    response_words = re.findall(r"\w+", response.lower())
    reference_words = re.findall(r"\w+", reference.lower())
    if not response_words or not reference_words:
        return float(response_words == reference_words)
    common = sum(
        (collections.Counter(response_words) & collections.Counter(reference_words)).values()
    )
    if common == 0:
        return 0.0
    precision = common / len(response_words)
    recall = common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def noise_offset(seed, prompt: str, noise: int) -> int:
    """The stand-in's reproducible noise: an integer from -noise to noise."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).hexdigest()
    return int(digest, 16) % (2 * noise + 1) - noise


def length_share(text: str) -> float:
    """A number from 0 to 1 that grows with the words of `text`: the length judge's score."""
    words = len(text.split())
    return words / (words + 20)


def pairwise_reply(match: re.Match, bias: str | None) -> str:
    """The verdict on a pairwise prompt: "[[A]]", "[[B]]" or "[[C]]", with a reason."""
    if bias == "first":
        return "Answer A is better. [[A]]"
    if bias == "length":
        a, b = len(match["a"].split()), len(match["b"].split())
        reason = "Answer A is longer" if a > b else "Answer B is longer" if b > a else "Same length"
    else:
        a, b = overlap_f1(match["a"], match["output"]), overlap_f1(match["b"], match["output"])
        a, b = round(a, 2), round(b, 2)
        reason = f"Word overlap with the correct output: A {a:.2f}, B {b:.2f}"
    verdict = "A" if a > b else "B" if b > a else "C"
    return f"{reason}. [[{verdict}]]"


def judge_reply(prompt: str, seed=None, noise: int = 0, bias: str | None = None) -> str:
    """What the stand-in answers to a prompt: a score, a rubric level or a verdict."""
    pair = _PAIRWISE_PROMPT.search(prompt)
    if pair is not None:
        return pairwise_reply(pair, bias)
    rubric = _RUBRIC_PROMPT.search(prompt)
    if rubric is not None:
        share = length_share(rubric["response"]) if bias == "length" else None
        if share is None:
            share = overlap_f1(rubric["response"], rubric["output"])
        return str(1 + round(4 * share))
    match = _JUDGE_PROMPT.search(prompt)
    if match is None:
        return OTHER_PROMPT_REPLY
    if bias == "length":
        return str(round(100 * length_share(match["response"])))
    score = round(100 * overlap_f1(match["response"], match["output"]))
    if noise:
        score = min(100, max(0, score + noise_offset(seed, prompt, noise)))
    return str(score)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming, like Ollama's Go server
    server: _Server

    def log_message(self, format, *args):
        pass

    # -- plumbing ---------------------------------------------------------
    def _send_json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_chunk(self, obj) -> None:
        data = (json.dumps(obj) + "\n").encode("utf-8")
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stream_forever(self, first: bytes, then, delay: float, content_type="application/json"):
        """Answer 200 and send `first`, then the pieces of `then` (bytes: repeated) forever.

        Ends only when the client goes away (or the server stops)."""
        owner = self.server.owner
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = itertools.chain(
            [first], itertools.repeat(then) if isinstance(then, bytes) else then
        )
        try:
            for piece in pieces:
                if owner.stopping.is_set():
                    break
                if not piece:
                    continue  # an empty chunk would end the answer
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()
                owner.count_sent(len(piece))
                if delay:
                    time.sleep(delay)
        except OSError:  # the client closed the connection: what a real server sees too
            pass
        self.close_connection = True

    # -- blobs ------------------------------------------------------------
    def _send_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        owner = self.server.owner
        owner.log("HEAD", self.path, None)
        digest = self.path.removeprefix("/api/blobs/")
        if not self.path.startswith("/api/blobs/"):
            self._send_empty(404)
        elif not _DIGEST.fullmatch(digest):
            self._send_empty(400)
        else:
            self._send_empty(200 if owner.has_blob(digest) else 404)

    def _push_blob(self, digest: str) -> None:
        """POST /api/blobs/<digest>: read the bytes, check their SHA-256, keep the blob."""
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        sha, head, left = hashlib.sha256(), b"", length
        while left > 0:
            piece = self.rfile.read(min(left, 1 << 20))
            if not piece:
                break
            sha.update(piece)
            head = head or piece[:4]
            left -= len(piece)
        owner.log("POST", self.path, {"bytes": length})
        if not _DIGEST.fullmatch(digest):
            self._send_json(400, {"error": "invalid digest format"})
            return
        got = "sha256:" + sha.hexdigest()
        if owner.has_blob(digest):
            self._send_empty(200)
        elif got != digest.replace("-", ":", 1):
            self._send_json(400, {"error": f'digest mismatch, expected "{digest}", got "{got}"'})
        else:
            owner.add_blob(got, head, length)
            self._send_empty(201)

    def _create(self, body) -> None:
        """POST /api/create: a model from pushed GGUF blobs, a template and parameters."""
        owner = self.server.owner
        if not isinstance(body, dict):
            self._send_json(400, {"error": "missing request body"})
            return
        name = body.get("model") or body.get("name") or ""
        files = body.get("files")
        parameters = body.get("parameters") or {}
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9._-]+)?", name):
            self._send_json(400, {"error": "invalid model name"})
            return
        if not files and not body.get("from"):
            self._send_json(400, {"error": "neither 'from' or 'files' was specified"})
            return
        if not isinstance(files, dict) or not isinstance(parameters, dict):
            self._send_json(400, {"error": "json: cannot unmarshal the request body"})
            return
        for file_name, digest in files.items():
            if file_name.startswith("/") or ".." in file_name.split("/"):
                self._send_json(400, {"error": "file path must be relative"})
                return
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                self._send_json(400, {"error": "invalid digest format"})
                return
        for key, value in parameters.items():
            kind = PARAMETERS.get(key)
            if kind is None:
                self._send_json(400, {"error": f"unknown parameter '{key}'"})
                return
            if kind is list:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or (kind is int and float(value) != int(value)):
                self._send_json(400, {"error": f"invalid value for parameter '{key}'"})
                return
        statuses = ["parsing GGUF"]
        for digest in files.values():
            blob = owner.blob(digest)
            if blob is None:
                self._send_json(
                    500,
                    {"error": f"open blobs/{digest.replace(':', '-')}: no such file or directory"},
                )
                return
            if blob["head"] != b"GGUF":
                self._send_json(400, {"error": "supplied file was not in GGUF format"})
                return
            statuses.append(f"using existing layer {digest}")
        config = json.dumps(
            {"template": body.get("template"), "parameters": parameters}, sort_keys=True
        )
        for part in ("template", "system", "parameters"):
            if body.get(part):
                layer = hashlib.sha256(json.dumps(body[part], sort_keys=True).encode()).hexdigest()
                statuses.append(f"creating new layer sha256:{layer}")
        statuses += ["writing manifest", "success"]
        size = sum(owner.blob(d)["size"] for d in files.values())
        owner.add_model(name, size, hashlib.sha256(config.encode()).hexdigest(), body)
        if body.get("stream") is False:
            self._send_json(200, {"status": statuses[-1]})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for status in statuses:
            self._send_chunk({"status": status})
        self._end_chunks()

    # -- GET --------------------------------------------------------------
    def do_GET(self):
        owner = self.server.owner
        owner.log("GET", self.path, None)
        if self.path == "/":
            body = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/api/version":
            fault, delay, size = owner.take_fault("version")
            if fault == "endless-version":
                self._stream_forever(b'{"version": "0.', b"1" * (size or 65536), delay)
            else:
                self._send_json(200, {"version": owner.version})
        elif self.path == "/api/tags":
            self._send_json(200, {"models": owner.models})
        else:
            self._send_json(404, {"error": "404 page not found"})

    # -- POST /api/chat ---------------------------------------------------
    def do_POST(self):
        owner = self.server.owner
        if self.path.startswith("/api/blobs/"):
            self._push_blob(self.path.removeprefix("/api/blobs/"))
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        owner.log("POST", self.path, body)
        if self.path == "/api/create":
            self._create(body)
            return
        if self.path != "/api/chat":
            self._send_json(404, {"error": "404 page not found"})
            return
        if not isinstance(body, dict):
            self._send_json(400, {"error": "invalid character in request body"})
            return
        model = body.get("model")
        if not model:
            self._send_json(400, {"error": "model is required"})
            return
        if owner.find_model(model) is None:
            self._send_json(404, {"error": f"model '{model}' not found"})
            return
        messages = body.get("messages") or []
        prompt = messages[-1].get("content", "") if messages else ""

        fault, delay, size = owner.take_fault("chat")
        if fault == "trickle":
            line = json.dumps(
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": "5"},
                    "done": False,
                }
            )
            one_byte_at_a_time = (bytes([b]) for b in itertools.cycle((line + "\n").encode()))
            self._stream_forever(b"", one_byte_at_a_time, delay, "application/x-ndjson")
            return
        if fault == "slow":
            time.sleep(delay)
        if fault == "disconnect":
            self.close_connection = True
            return  # the socket closes with no answer at all
        if fault == "http-500":
            self._send_json(500, {"error": "llama runner process has terminated: exit status 2"})
            return
        seed = (body.get("options") or {}).get("seed")
        if fault == "no-number":
            reply = NO_NUMBER_REPLY
        elif fault == "huge-reply":
            digits = size or HUGE_REPLY_DIGITS
            reply = ("1234567890" * (digits // 10 + 1))[:digits]
        elif model in owner.created:
            reply = CREATED_MODEL_REPLY
        else:
            reply = judge_reply(prompt, seed, owner.noise, owner.bias)
        final = {
            "done_reason": "stop",
            "done": True,
            "total_duration": 1_250_000_000,
            "load_duration": 20_000_000,
            "prompt_eval_count": max(1, len(prompt) // 4),
            "prompt_eval_duration": 900_000_000,
            "eval_count": max(1, len(reply) // 2),
            "eval_duration": 300_000_000,
        }
        if body.get("stream") is False:
            self._send_json(
                200,
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": reply},
                    **final,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = [reply[i : i + 2] for i in range(0, len(reply), 2)]  # a "token" = 2 characters
        if fault == "error-mid-stream":
            pieces = pieces[: max(1, len(pieces) // 2)]
        for piece in pieces:
            self._send_chunk(
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": piece},
                    "done": False,
                }
            )
        if fault == "error-mid-stream":
            self._send_chunk(
                {"error": "an error was encountered while running the model: unexpected EOF"}
            )
        else:
            self._send_chunk(
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    **final,
                }
            )
        self._end_chunks()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: OllamaStandIn


class OllamaStandIn:
    """The stand-in server; `url` is its base address, `requests` what it received."""

    def __init__(
        self,
        port: int = 0,
        models: list[dict] | None = None,
        version: str = VERSION,
        noise: int = 0,
        bias: str | None = None,
    ):
        self.set_bias(bias)
        self.models = [dict(m) for m in (MODELS if models is None else models)]
        self.version = version
        self.noise = noise
        self.requests: list[dict] = []
        self.blobs: dict[str, dict] = {}  # digest -> {"head": first 4 bytes, "size"}
        self.created: dict[str, dict] = {}  # model name -> the /api/create request
        self._fault: str | None = None
        self._fault_times: int | None = None
        self._delay = 0.0
        self._size: int | None = None
        self.sent_bytes = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.owner = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OllamaStandIn:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # ends the endless answers still being sent
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OllamaStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- behaviour switches -------------------------------------------------
    def set_fault(
        self,
        fault: str | None,
        times: int | None = None,
        delay: float = 0.0,
        size: int | None = None,
    ) -> None:
        """Misbehave in the way `fault` names for the next `times` requests it affects."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}: use one of {', '.join(FAULTS)}")
        with self._lock:
            self._fault, self._fault_times, self._delay = fault, times, delay
            self._size = size

    def set_noise(self, noise: int) -> None:
        """Move every score by a reproducible offset from -noise to noise (0: exact)."""
        if noise < 0:
            raise ValueError("noise must be 0 or more")
        self.noise = noise

    def set_bias(self, bias: str | None) -> None:
        """Judge with a known flaw: "first" (the first-shown answer), "length", or None."""
        if bias is not None and bias not in BIASES:
            raise ValueError(f"unknown bias {bias!r}: use one of {', '.join(BIASES)} or None")
        self.bias = bias

    def take_fault(self, endpoint: str) -> tuple[str | None, float, int | None]:
        """The fault for this request of `endpoint` ("chat" or "version"), its delay and size."""
        with self._lock:
            fault = self._fault
            if fault is None or FAULTS[fault] != endpoint:
                return None, 0.0, None
            if self._fault_times is not None:
                self._fault_times -= 1
                if self._fault_times <= 0:
                    self._fault = None
            return fault, self._delay, self._size

    def count_sent(self, n: int) -> None:
        with self._lock:
            self.sent_bytes += n

    def add_blob(self, digest: str, head: bytes, size: int) -> None:
        with self._lock:
            self.blobs[digest] = {"head": head, "size": size}

    def blob(self, digest: str) -> dict | None:
        with self._lock:
            return self.blobs.get(digest.replace("-", ":", 1))

    def has_blob(self, digest: str) -> bool:
        return self.blob(digest) is not None

    def add_model(self, name: str, size: int, digest: str, request: dict) -> None:
        """A model made by /api/create: listed by /api/tags, answered on /api/chat."""
        tag = name if ":" in name else name + ":latest"
        entry = {
            "name": tag,
            "model": tag,
            "modified_at": _now(),
            "size": size,
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "gpt2",
                "families": ["gpt2"],
                "parameter_size": "",
                "quantization_level": "",
            },
        }
        with self._lock:
            self.models = [m for m in self.models if m["name"] != tag] + [entry]
            self.created[tag] = request
            self.created[name] = request

    def find_model(self, name: str) -> dict | None:
        wanted = {name} if ":" in name else {name, name + ":latest"}
        return next((m for m in self.models if m["name"] in wanted), None)

    def log(self, method: str, path: str, body) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "body": body})

    @property
    def chat_requests(self) -> list[dict]:
        """The bodies of the POST /api/chat requests received so far."""
        with self._lock:
            return [r["body"] for r in self.requests if r["path"] == "/api/chat"]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Serve the Ollama stand-in.")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--noise", type=int, default=0, help="vary scores by up to this much")
    parser.add_argument("--bias", choices=BIASES, help="a judge with this known flaw")
    args = parser.parse_args()
    server = OllamaStandIn(port=args.port, noise=args.noise, bias=args.bias).start()
    print(f"Ollama stand-in at {server.url} (Ctrl+C stops it)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
