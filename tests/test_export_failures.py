"""Notebook 11's export when things go wrong, each failure made the way a user meets it.

- a real phi3 run of the offline model (`python -m course.finetune --prompt-style phi3`)
  exported and loaded in llama.cpp, which refuses a GPT-2 file named "...phi3...";
- notebook 11 run whole (nbclient) at COURSE_MAX_NEW_TOKENS=16, then chat() with an
  instruction that nearly fills the context and one that overfills it;
- greedy decoding on an engine opened with open_llama()'s defaults;
- an export into a read-only mount (root ignores chmod, so a read-only tmpfs in a
  private mount namespace, as tests/test_reliability.py does) and an export killed
  with SIGKILL half-way;
- registration against hostile loopback servers: a create that streams status lines
  forever, a 200 that is not JSON, an Ollama that stops after the version check, and
  Ollamas older than the API the course uses. Each server stops with its test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from test_reliability import child_env, run_on_small_disk

import helpers
from course import (
    artifacts,
    export,
    gguf_file,
    llama_engine,
    ollama_registry,
    responses,
    settings,
    speed,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "11_exporting_to_gguf_and_ollama.ipynb"


def finetune(place: Path, name: str, *extra: str) -> Path:
    """A real offline run of notebook 05's training (course.finetune) into place/name."""
    folder = place / name
    env = {
        **os.environ,
        "COURSE_ARTIFACTS": str(folder),
        "COURSE_MODELS_DIR": str(place / "gpt2"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    cmd = [sys.executable, "-m", "course.finetune", "--offline", "--epochs", "1", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-runs")


@pytest.fixture(scope="module")
def offline_f32(tmp_path_factory) -> tuple[helpers.GPTModel, Path]:
    torch.manual_seed(123)
    model = helpers.GPTModel(settings.model_config("offline")).eval()
    path = tmp_path_factory.mktemp("gguf") / "offlinetiny-sft.gguf"
    gguf_file.write_gguf(model, settings.model_config("offline"), path, "f32", "offlinetiny")
    return model, path


def fast_tokens(model, ids: list[int], n: int) -> list[int]:
    out = speed.generate_fast(model, torch.tensor([ids]), n, 1024, eos_id=50256)
    return out[0, len(ids) :].tolist()


# -- a phi3 run's file loads in llama.cpp ---------------------------------------------------


def test_a_phi3_runs_gguf_loads_in_llama_cpp_and_gives_the_courses_greedy_tokens(
    place, monkeypatch
):
    folder = finetune(place, "phi3", "--prompt-style", "phi3", "--data-limit", "60")
    for name, value in {
        "COURSE_ARTIFACTS": str(folder),
        "COURSE_MODEL": "offline",
        "COURSE_PROMPT_STYLE": "phi3",
        "COURSE_DATA_LIMIT": "60",
    }.items():
        monkeypatch.setenv(name, value)
    run = artifacts.training_run()  # what notebook 11's first cells do
    assert "phi3" in run["stem"]
    export_stem = responses.responses_stem(run["stem"], "sft")
    model = export.load_weights("offline", responses.weights_path(run["stem"], "sft"))
    cfg = settings.model_config("offline")
    path = gguf_file.write_gguf(model, cfg, folder / "run.gguf", "f32", name=export_stem)
    llm = llama_engine.open_llama(path)  # llama.cpp refused a file named "...phi3..."
    meta = gguf_file.gguf_metadata(path)
    assert "phi3" not in meta["general.name"].lower()
    assert meta[gguf_file.RUN_KEY] == export_stem  # the file still records its run
    prompt = helpers.format_input(
        {"instruction": "Name a color.", "input": ""}, "phi3"
    ) + helpers.format_response({"output": ""}, "phi3")
    ids = helpers.get_tokenizer().encode(prompt)
    assert llama_engine.llama_tokenize(llm, prompt) == ids
    assert llama_engine.llama_greedy(llm, ids, 12, eos_id=50256) == fast_tokens(model, ids, 12)


def test_no_name_makes_llama_cpp_load_gpt2_differently():
    for run in ("offlinetiny-phi3", "gpt2-medium355M-lora-PHI-3-masked", "phphi33", "phi3"):
        name = gguf_file.general_name(run)
        assert not any(word in name.lower() for word in gguf_file.NAMES_LLAMA_CPP_KEYS_ON), name
    assert gguf_file.general_name("gpt2-medium355M-lora-phi3-masked") == (
        "gpt2-medium355M-lora-masked"
    )
    assert gguf_file.general_name("offlinetiny") == "offlinetiny"


# -- notebook 11 at any token limit --------------------------------------------------------

LONG_CHAT = textwrap.dedent(
    """
    long = "Summarize this text: " + "The quick brown fox jumps over the lazy dog. " * 88
    print("PROMPT TOKENS", len(tokenizer.encode(long)))
    answer = chat(long, max_tokens=256)
    print("ANSWERED", answer is not None)
    try:
        chat(long * 2)
    except export.ExportError as exc:
        print("TOO LONG:", exc)
    """
)


def test_notebook_11_runs_at_16_new_tokens_and_chats_up_to_the_context(
    place, monkeypatch, ollama_standin
):
    folder = finetune(place, "alpaca", "--data-limit", "200")
    for name, value in {
        "COURSE_ARTIFACTS": str(folder),
        "COURSE_MODELS_DIR": str(place / "gpt2"),
        "COURSE_MODEL": "offline",
        "COURSE_DATA_LIMIT": "200",
        "COURSE_MAX_NEW_TOKENS": "16",
    }.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if "colab-setup" not in c.metadata.get("tags", [])]
    nb.cells.append(nbformat.v4.new_code_cell(LONG_CHAT))
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    prompt_tokens = int(out.split("PROMPT TOKENS")[1].split()[0])
    assert 1024 - 256 < prompt_tokens < 1000  # with 256 more, past the model's 1,024
    assert "ANSWERED True" in out
    assert "TOO LONG:" in out and "shorten the instruction" in out
    assert not (folder / gguf_file.COMPARISON_FOLDER).exists()  # section 7 removed it


def test_greedy_decoding_works_on_an_engine_with_open_llamas_defaults(offline_f32, tokenizer):
    model, path = offline_f32
    llm = llama_engine.open_llama(path)  # no logits_all, the model's context
    ids = tokenizer.encode(helpers.format_input({"instruction": "Name a color.", "input": ""}))
    tokens = llama_engine.llama_greedy(llm, ids, 10)
    assert tokens == fast_tokens(model, ids, 10)
    assert tokens != [0] * 10
    with pytest.raises(export.ExportError, match="logits_all=True"):
        llama_engine.llama_logits(llm, ids)
    # at the context's end greedy decoding stops instead of failing
    near_end = (ids * 100)[: llama_engine.context_size(llm) - 3]
    assert 1 <= len(llama_engine.llama_greedy(llm, near_end, 50)) <= 4


# -- export failures ------------------------------------------------------------------------

READ_ONLY_EXPORT = textwrap.dedent(
    """
    import json, os, sys
    import helpers
    from course import artifacts, gguf_file, settings

    cfg = settings.model_config("offline")
    target = os.path.join(sys.argv[1], "artifacts", "offlinetiny-sft.gguf")
    try:
        gguf_file.write_gguf(helpers.GPTModel(cfg), cfg, target, "f16", "offlinetiny")
        result = ["written"]
    except Exception as exc:
        result = [type(exc).__name__, isinstance(exc, artifacts.ArtifactError), str(exc)]
    result.append(sorted(os.listdir(os.path.dirname(target))))
    print(json.dumps(result))
    """
)


def test_an_export_into_a_read_only_folder_says_what_to_do(tmp_path):
    prepare = 'mkdir "$1/artifacts" && mount -o remount,ro "$1"'
    kind, clear, message, files = run_on_small_disk(tmp_path, READ_ONLY_EXPORT, prepare)
    assert clear, (kind, message)
    assert "offlinetiny-sft.gguf" in message and "is not writable" in message, message
    assert "COURSE_ARTIFACTS" in message
    assert files == []


STUCK_EXPORT = textwrap.dedent(
    """
    import sys, time
    import gguf
    import helpers
    from course import gguf_file, settings

    def write_tensors_to_file(self, **kwargs):  # the header is written; hold until killed
        print("writing", flush=True)
        time.sleep(600)

    gguf.GGUFWriter.write_tensors_to_file = write_tensors_to_file
    cfg = settings.model_config("offline")
    gguf_file.write_gguf(helpers.GPTModel(cfg), cfg, sys.argv[1], "f32", "offlinetiny")
    """
)


def test_an_export_killed_half_way_leaves_nothing_after_the_next_export(tmp_path, offline_f32):
    path = tmp_path / "offlinetiny-sft.gguf"
    writer = subprocess.Popen(
        [sys.executable, "-c", STUCK_EXPORT, str(path)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert left.exists()  # what kill -9 leaves
    model, _ = offline_f32
    gguf_file.write_gguf(model, settings.model_config("offline"), path, "f16", "offlinetiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert gguf_file.gguf_metadata(path)["general.name"] == "offlinetiny"


def test_the_comparison_folder_is_emptied_when_the_notebook_starts_again(tmp_path):
    old = gguf_file.comparison_folder(tmp_path) / "offlinetiny-f32.gguf"
    old.write_bytes(b"GGUF from a run that stopped before its clean-up")
    again = gguf_file.comparison_folder(tmp_path)
    assert again == old.parent and list(again.iterdir()) == []


# -- registration against hostile servers --------------------------------------------------


class Hostile:
    """A loopback server that answers Ollama's paths as `routes` says; stops on exit.

    routes: {"GET /api/version": (status, body bytes or a generator of byte pieces)}.
    A generator is streamed piece by piece (never past 30 s, nor after the test).
    """

    def __init__(self, routes: dict):
        self.routes, self.requests, self.stopping = routes, [], threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                while length > 0:  # read (and drop) an upload
                    length -= len(self.rfile.read(min(length, 1 << 16)))
                key = f"{self.command} {self.path.split('/sha256')[0]}"
                owner.requests.append(key)
                status, body = owner.routes.get(key, (404, b"404 page not found"))
                self.send_response(status)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                self.send_header("Connection", "close")
                self.end_headers()
                for piece in body:
                    if owner.stopping.is_set():
                        return
                    self.wfile.write(piece)
                    self.wfile.flush()

            do_GET = do_POST = do_HEAD = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Hostile:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def version(v: str) -> tuple[int, bytes]:
    return 200, json.dumps({"version": v}).encode()


def endless_status_lines():
    for _ in range(600):  # 30 s at most
        yield b'{"status":"parsing GGUF"}\n'
        time.sleep(0.05)


def test_a_create_that_streams_forever_ends_at_its_deadline(offline_f32, monkeypatch):
    monkeypatch.setattr(ollama_registry, "CREATE_MAX_S", 1.5)
    routes = {
        "GET /api/version": version("0.6.2"),
        "HEAD /api/blobs": (200, b""),
        "POST /api/create": (200, endless_status_lines()),
    }
    with Hostile(routes) as server:
        started = time.monotonic()
        with pytest.raises(export.ExportError, match=r"did not finish .* within 1.5 s"):
            ollama_registry.register_with_ollama(offline_f32[1], "m", "alpaca", 1024, server.url)
        assert time.monotonic() - started < 10


def test_a_200_that_is_not_json_says_it_is_not_ollama(offline_f32):
    routes = {
        "GET /api/version": version("0.6.2"),
        "HEAD /api/blobs": (200, b""),
        "POST /api/create": (200, b"<html><body>Welcome to nginx!</body></html>"),
    }
    with Hostile(routes) as server:
        with pytest.raises(export.ExportError, match=r"not Ollama's answer.*OLLAMA_HOST"):
            ollama_registry.register_with_ollama(offline_f32[1], "m", "alpaca", 1024, server.url)


def gone_after_one_answer(body: bytes) -> str:
    """A server that answers one request and stops listening before it sends the answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        finally:
            listener.close()  # from now on, connecting is refused
        with conn:
            conn.settimeout(30)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096) or b"\r\n\r\n"
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + body)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_an_ollama_that_stops_after_the_version_check_says_to_start_it(offline_f32):
    url = gone_after_one_answer(json.dumps({"version": "0.6.2"}).encode())
    with pytest.raises(export.ExportError, match=r"(?s)did not answer.*ollama serve"):
        ollama_registry.register_with_ollama(offline_f32[1], "m", "alpaca", 1024, url)


def test_an_ollama_too_old_for_the_files_api_says_to_update(offline_f32):
    old_create = (400, json.dumps({"error": "path or modelfile are required"}).encode())
    cases = [
        # an old release: refused before anything is uploaded
        {"GET /api/version": version("0.5.4"), "POST /api/create": old_create},
        # a build from source (0.0.0) of an old one: its create answers 400
        {
            "GET /api/version": version("0.0.0"),
            "POST /api/blobs": (201, b""),
            "POST /api/create": old_create,
        },
        # one older than the blob API: 404, plain text
        {"GET /api/version": version("0.0.0")},
    ]
    for routes in cases:
        with Hostile(routes) as server:
            with pytest.raises(export.ExportError, match=r"(?s)older than.*Update Ollama"):
                ollama_registry.register_with_ollama(
                    offline_f32[1], "m", "alpaca", 1024, server.url
                )
        if routes["GET /api/version"] == version("0.5.4"):
            assert server.requests == ["GET /api/version"]
