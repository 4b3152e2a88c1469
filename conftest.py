"""Test set-up that must hold for every pytest run, notebooks alone included.

Before any notebook kernel starts, point the course at the offline model and at a
fresh artifacts folder, so `pytest --nbval` runs the notebooks with no network and
never touches a student's own artifacts/. The judge scores once per response set
(COURSE_JUDGE_RUNS=1; a student's default is 3), which is what the stored outputs show.
Variables you set yourself win (setdefault).

The LLM judge: a stand-in Ollama server (tests/ollama_standin.py) starts for the
whole session and OLLAMA_HOST points at it, replacing any OLLAMA_HOST of yours, so
notebook 09 scores deterministically. COURSE_REAL_JUDGE=1 keeps your OLLAMA_HOST
(and your real Ollama) for the notebooks instead; their judge scores then differ
from the stored ones. The unit tests always use stand-ins of their own.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))
from ollama_standin import OllamaStandIn  # noqa: E402

_session_judge = None
_run_dir = None


def pytest_configure(config):
    global _session_judge, _run_dir
    os.environ.setdefault("COURSE_MODEL", "offline")
    run_dir = _run_dir = tempfile.mkdtemp(prefix="course-tests-")
    os.environ.setdefault("COURSE_ARTIFACTS", os.path.join(run_dir, "artifacts"))
    os.environ.setdefault("COURSE_MODELS_DIR", os.path.join(run_dir, "gpt2"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("COURSE_JUDGE_RUNS", "1")
    real_judge = os.environ.get("COURSE_REAL_JUDGE", "").strip().lower()
    if real_judge not in ("1", "true", "yes", "on") and _session_judge is None:
        _session_judge = OllamaStandIn().start()
        os.environ["OLLAMA_HOST"] = _session_judge.url


def pytest_unconfigure(config):
    global _session_judge, _run_dir
    if _session_judge is not None:
        _session_judge.stop()
        _session_judge = None
    if _run_dir is not None:  # the temporary artifacts and models of this session
        shutil.rmtree(_run_dir, ignore_errors=True)
        _run_dir = None
