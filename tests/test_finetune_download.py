"""A slow first download under torchrun: the other processes wait for it, however long.

Under `torchrun -m course.finetune` rank 0 downloads GPT-2 while the other processes
wait. A wait inside a collective call (a barrier) ends when the process group's
timeout runs out: PyTorch's default is 10 minutes for NCCL and 30 for gloo, so a
first download slower than that killed the run in the middle of the download.

The test runs that at a smaller scale, with real processes and a real download: two
gloo processes whose PyTorch default timeout is set to 12 s (the one change made to
the processes, by a `sitecustomize` module), and GPT-2 small's host a loopback HTTP
server that trickles the seven files over about 36 s. So that the run stays small,
the files are the offline model's, and GPT-2 small's configuration in those processes
is the offline model's. The run must finish with the course's artifacts.

Ctrl+C during the first download (one process) must say, in the command line's
words, that nothing was lost and what to run; a download that never ends stops with
one grammatical sentence that says what to check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gpt2_fixtures import offline_gpt2_files  # noqa: F401 (a fixture)

from course import weights

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 12  # the process group's timeout in the test (PyTorch: 600 for NCCL)
DOWNLOAD_SECONDS = 36  # how long the trickled download takes in all
STEM = "gpt2-small124M-book-n60"

SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    if os.environ.get("SLOW_TEST_GPT2_URL"):
        import datetime
        import torch.distributed.distributed_c10d as c10d

        seconds = float(os.environ["SLOW_TEST_PG_TIMEOUT"])
        c10d.default_pg_timeout = datetime.timedelta(seconds=seconds)

        import helpers  # before course.weights copies the hosts
        helpers.GPT2_BASE_URL = os.environ["SLOW_TEST_GPT2_URL"]
        helpers.GPT2_BACKUP_BASE_URL = os.environ["SLOW_TEST_GPT2_URL"] + "/backup"
        helpers.model_configs["gpt2-small (124M)"] = {"emb_dim": 64, "n_layers": 2, "n_heads": 2}
    """
)


class TrickleServer:
    """Serve `files` ({"/124M/hparams.json": bytes}) on loopback, slowly: each file in
    ten pieces with a pause before each, all files together in about `seconds`."""

    def __init__(self, files: dict[str, bytes], seconds: float):
        pause = seconds / (10 * len(files))
        self.served: list[tuple[str, float]] = []  # (path, when its last byte went)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                piece = -(-len(body) // 10)
                try:
                    for start in range(0, len(body), piece):
                        time.sleep(pause)
                        self.wfile.write(body[start : start + piece])
                        self.wfile.flush()
                except OSError:  # the client went away
                    return
                owner.served.append((self.path, time.monotonic()))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> TrickleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def slow_download_env(tmp_path: Path, url: str) -> dict[str, str]:
    """The processes' environment: GPT-2's host at `url`, a short process group timeout."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
        "SLOW_TEST_GPT2_URL": url,
        "SLOW_TEST_PG_TIMEOUT": str(TIMEOUT_SECONDS),
        "COURSE_ARTIFACTS": str(tmp_path / "artifacts"),
        "COURSE_MODELS_DIR": str(tmp_path / "gpt2"),
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


SETTINGS = ["--model", "gpt2-small", "--epochs", "1", "--data-limit", "60", "--device", "cpu"]


def test_a_download_longer_than_the_process_group_timeout_finishes_the_run(
    tmp_path,
    offline_gpt2_files,  # noqa: F811
):
    folder = tmp_path / "artifacts"
    files = {f"/124M/{name}": body for name, body in offline_gpt2_files.items()}
    with TrickleServer(files, DOWNLOAD_SECONDS) as server:
        env = slow_download_env(tmp_path, server.url)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
        cmd += ["-m", "course.finetune", *SETTINGS, "--batch-size", "4"]
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    report = done.stdout[-3000:] + done.stderr[-4000:]
    assert done.returncode == 0, report
    # the scene is the failure's: the download outlasted the processes' timeout
    assert len(server.served) == len(files), report
    last_byte = max(when for _, when in server.served)
    assert last_byte - started > TIMEOUT_SECONDS + 10, report
    # and the run finished, with the course's artifacts
    assert f"Saved {STEM}-sft.pth" in done.stdout, report
    log = json.loads((folder / f"{STEM}-training-log.json").read_text(encoding="utf-8"))
    assert log["config"]["processes"] == 2 and log["eval_steps"] == [0, 5]
    assert sorted(p.name for p in (tmp_path / "gpt2" / "124M").iterdir()) == sorted(
        offline_gpt2_files
    )


def test_ctrl_c_during_the_first_download_says_what_to_do(tmp_path, offline_gpt2_files):  # noqa: F811
    files = {f"/124M/{name}": body for name, body in offline_gpt2_files.items()}
    with TrickleServer(files, 600) as server:
        env = slow_download_env(tmp_path, server.url)
        cmd = [sys.executable, "-m", "course.finetune", *SETTINGS]
        process = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while not list((tmp_path / "gpt2").glob("124M/*.part")):  # the download has begun
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no download within 4 minutes"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl+C in a terminal: the whole group
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out[-2000:] + err[-3000:]
    assert "Stopped by Ctrl+C" in err, err[-3000:]
    assert "No checkpoint was saved yet: run the same command again" in err, err[-3000:]
    assert "Traceback" not in err and "the cell" not in out + err, out[-2000:] + err[-3000:]


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
