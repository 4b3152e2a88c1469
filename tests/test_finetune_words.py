"""The command line speaks the command line's words, not the notebooks'.

- A download that never ends stops with one grammatical sentence and what to check.
- Ctrl+C in `python -m course.finetune` during training, and a checkpoint it refuses
  to continue, name what to run: the same command, `--retrain`, `--batch-size`; never
  "the cell" or `force=True`. These two messages are printed by the training loop
  (course.training), which course.finetune asks for the command line's words.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from course import weights

ROOT = Path(__file__).resolve().parent.parent
STEM = "offlinetiny-book-n60"
SETTINGS = ["--offline", "--epochs", "1", "--data-limit", "60"]
NOTEBOOK_WORDS = ("the cell", "training cell", "force=True")


def test_a_download_that_never_ends_stops_with_one_clear_sentence(tmp_path):
    class Endless(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()  # no Content-Length: the size shows only as bytes arrive
            try:
                while True:
                    self.wfile.write(b"x" * 65536)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/model.ckpt.data-00000-of-00001"
    try:
        with pytest.raises(weights.DownloadTooLarge) as info:
            weights.download_file(
                url, tmp_path / "model.bin", show_progress=False, max_bytes=300_000
            )
    finally:
        server.shutdown()
        server.server_close()
    message = str(info.value)
    assert f"The download from {url} sent more than the 300,000 bytes allowed for it" in message
    assert "more, more" not in message
    assert message.endswith("Check that the address names the file you meant.")
    assert list(tmp_path.iterdir()) == []


# -- the training loop's messages under python -m course.finetune -----------------------


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The offline model and the split, made once for the runs of this module."""
    place = tmp_path_factory.mktemp("finetune-words")
    out = finetune(place, "first", "--max-steps", "1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return place


def finetune(place: Path, name: str, *extra: str, wait: bool = True):
    folder = place / name
    folder.mkdir(exist_ok=True)
    split = place / "first" / "split-book-n60.json"
    if split.exists() and not (folder / split.name).exists():
        shutil.copy(split, folder)
    env = {
        **os.environ,
        "COURSE_ARTIFACTS": str(folder),
        "COURSE_MODELS_DIR": str(place / "gpt2"),
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    cmd = [sys.executable, "-m", "course.finetune", *SETTINGS, *extra]
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_ctrl_c_in_training_names_the_same_command(place):
    folder = place / "interrupted"
    process = finetune(place, "interrupted", "--checkpoint-every", "1", wait=False)
    checkpoint = folder / f"{STEM}-train-checkpoint.pth"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl+C in a terminal: the whole group
    out, err = process.communicate(timeout=120)
    said = out + err
    assert process.returncode == 130, said[-3000:]
    assert "Interrupted" in said and checkpoint.name in said, said[-3000:]
    assert "same command" in said, said[-3000:]
    assert not [words for words in NOTEBOOK_WORDS if words in said], said[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_refused_checkpoint_names_the_flags(place):
    # the first run stopped after one step (--max-steps 1), with a global batch of 8
    refused = finetune(place, "first", "--batch-size", "4")
    said = refused.stdout + refused.stderr
    assert refused.returncode == 1, said[-3000:]
    assert "batch_size 8 then, 4 now" in refused.stderr, said[-3000:]
    assert "--retrain" in refused.stderr and "--batch-size" in refused.stderr, said[-3000:]
    assert not [words for words in NOTEBOOK_WORDS if words in said], said[-3000:]
