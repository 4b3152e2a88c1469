"""Google Colab set-up: `setup`, which the Colab cell at the top of every notebook calls after
cloning the course, and `start_ollama` for notebook 09's judge. Outside Colab neither does
anything; only the standard library is imported at the top (it runs before the installs).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

COURSE_ROOT = Path(__file__).resolve().parent.parent

# import name -> pip name: what the course needs beyond what Colab ships (Colab has torch,
# numpy, matplotlib, tqdm, psutil and tensorflow; tiktoken and safetensors vary)
REQUIRED = {
    "tiktoken": "tiktoken",
    "safetensors": "safetensors",
    "tensorflow": "tensorflow",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "psutil": "psutil",
    "gguf": "gguf",  # notebook 11 writes GGUF files with it
}
PIP = [sys.executable, "-m", "pip"]  # how packages are installed
DRIVE_MOUNTPOINT = "/content/drive"  # where Colab mounts Google Drive
OLLAMA_INSTALL = "curl -fsSL https://ollama.com/install.sh | sh"  # Ollama's own installer
OLLAMA_START_SECONDS = 60  # how long start_ollama waits for `ollama serve` to answer


def on_colab() -> bool:
    """True inside a Google Colab notebook (its `google.colab` module is loaded)."""
    return "google.colab" in sys.modules


def missing_packages() -> list[str]:
    """The pip names of the REQUIRED packages that cannot be imported here."""
    return [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]


def setup(keep_artifacts_on_drive: bool = False, mountpoint: str | None = None) -> None:
    """Make a Colab machine ready for the course, and print what was done.

    Installs the REQUIRED packages that are missing (with pip). With
    `keep_artifacts_on_drive=True` it mounts Google Drive (Colab asks for permission)
    and points COURSE_ARTIFACTS at MyDrive/<course folder>-artifacts, so that what one
    notebook writes survives a disconnect and is there for the next notebook, which
    Colab runs on a new machine. Outside Colab it does nothing.
    """
    if not on_colab():
        return
    done = {"installed": [], "artifacts": None}
    missing = missing_packages()
    if missing:
        print("Installing", ", ".join(missing), "...")
        result = subprocess.run([*PIP, "install", "--quiet", *missing], text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"pip could not install {', '.join(missing)} (exit status {result.returncode}; "
                "its messages are above). Check the network and run this cell again."
            )
        importlib.invalidate_caches()
        done["installed"] = missing
    if keep_artifacts_on_drive:
        from google.colab import drive  # only on Colab

        mountpoint = Path(mountpoint or DRIVE_MOUNTPOINT)
        drive.mount(str(mountpoint))
        artifacts = mountpoint / "MyDrive" / f"{COURSE_ROOT.name}-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        os.environ["COURSE_ARTIFACTS"] = str(artifacts)
        done["artifacts"] = str(artifacts)
    print("Course files:", COURSE_ROOT)
    print("Installed:   ", ", ".join(done["installed"]) or "nothing (Colab has it all)")
    if done["artifacts"]:
        print("Artifacts:   ", done["artifacts"], "(on Google Drive)")
    elif os.environ.get("COURSE_ARTIFACTS"):
        print("Artifacts:   ", os.environ["COURSE_ARTIFACTS"])
    else:
        print("Artifacts:    artifacts/ on this Colab machine only: lost when it disconnects.")
        print("              setup(keep_artifacts_on_drive=True) keeps them on Google Drive.")


def _ollama_url() -> str:
    text = os.environ.get("OLLAMA_HOST") or "http://localhost:11434"
    return text if "://" in text else "http://" + text


def ollama_answers(url: str | None = None, timeout: float = 2) -> bool:
    """True when an Ollama server answers /api/version at `url` (default: OLLAMA_HOST)."""
    try:
        with urllib.request.urlopen((url or _ollama_url()) + "/api/version", timeout=timeout):
            return True
    except OSError:
        return False


def _run(command: str | list[str], what: str) -> None:
    result = subprocess.run(command, shell=isinstance(command, str), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit status {result.returncode}):\n{result.stderr[-2000:]}"
        )


def start_ollama(judge_model: str = "llama3") -> None:
    """On Colab: install Ollama if needed, start `ollama serve`, pull `judge_model`.

    The book's judge, llama3 (8B, 4-bit), is a 4.7 GB download and needs about 6 to 8
    GB of GPU memory (or as much RAM without a GPU). Waits up to OLLAMA_START_SECONDS
    for the server to answer (at OLLAMA_HOST, default http://localhost:11434).
    Outside Colab it does nothing: install and start Ollama yourself (https://ollama.com).
    """
    if not on_colab():
        return
    url = _ollama_url()
    if shutil.which("ollama") is None:
        # Ollama's installer unpacks with zstd and looks for the GPU with lspci (pciutils)
        if shutil.which("zstd") is None or shutil.which("lspci") is None:
            print("Installing zstd and pciutils (Ollama's installer needs them) ...")
            _run("apt-get update -qq && apt-get install -y -qq zstd pciutils", "apt-get")
        print("Installing Ollama ...")
        _run(OLLAMA_INSTALL, "Installing Ollama")
    if not ollama_answers(url):
        log_path = os.path.join(tempfile.gettempdir(), "ollama.log")
        with open(log_path, "ab") as log:
            subprocess.Popen(["ollama", "serve"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + OLLAMA_START_SECONDS
        while not ollama_answers(url):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Ollama did not start within {OLLAMA_START_SECONDS} s: see {log_path}."
                )
            time.sleep(0.5)
    print(f"Ollama is running at {url}.")
    print(f"Pulling {judge_model} (llama3 is a 4.7 GB download) ...")
    _run(["ollama", "pull", judge_model], f"ollama pull {judge_model}")
    print(f"{judge_model} is ready.")
