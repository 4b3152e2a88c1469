"""Test set-up that must hold for every pytest run, notebooks alone included.

Before any notebook kernel starts, point the course at the offline model and at a
fresh artifacts folder, so `pytest --nbval` runs the notebooks with no network and
never touches a student's own artifacts/. The judge scores once per response set
(COURSE_JUDGE_RUNS=1; a student's default is 3), which is what the stored outputs show.
Variables you set yourself win (setdefault). MPLBACKEND is removed, so the kernels
draw with Jupyter's inline backend, as when the outputs were stored (with another
backend a plotting cell shows no figure and nbval reports a missing output).

The LLM judge: a stand-in Ollama server (tests/ollama_standin.py) starts for the
whole session and OLLAMA_HOST points at it, replacing any OLLAMA_HOST of yours, so
notebook 09 scores deterministically. COURSE_REAL_JUDGE=1 keeps your OLLAMA_HOST
(and your real Ollama) for the notebooks instead; their judge scores then differ
from the stored ones. The unit tests always use stand-ins of their own.

tools/store_outputs.py stores notebook outputs in this same environment
(`notebook_environment`).
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


def notebook_environment(environ=os.environ) -> OllamaStandIn | None:
    """Set the environment the stored notebook outputs are made and checked in.

    The offline model, one judge run, a short DPO run in notebook 10 (the first 120
    training pairs), the inline plotting backend and, unless
    COURSE_REAL_JUDGE is set, a stand-in judge (started here; the caller stops it).
    """
    environ.setdefault("COURSE_MODEL", "offline")
    environ.setdefault("COURSE_JUDGE_RUNS", "1")
    # notebook 10: 15 DPO steps, not 116 (the offline model's whole epoch took 1.4 to 2.2
    # minutes of training on two CPU cores); the notebook names the subset in its output
    environ.setdefault("COURSE_DPO_LIMIT", "120")
    environ.pop("MPLBACKEND", None)
    if environ.get("COURSE_REAL_JUDGE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    judge = OllamaStandIn().start()
    environ["OLLAMA_HOST"] = judge.url
    return judge


def pytest_configure(config):
    global _session_judge, _run_dir
    _run_dir = tempfile.mkdtemp(prefix="course-tests-")
    os.environ.setdefault("COURSE_ARTIFACTS", os.path.join(_run_dir, "artifacts"))
    os.environ.setdefault("COURSE_MODELS_DIR", os.path.join(_run_dir, "gpt2"))
    if _session_judge is None:
        _session_judge = notebook_environment()
    try:  # the unit tests draw without a display (the kernels keep the inline backend)
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass


def pytest_unconfigure(config):
    global _session_judge, _run_dir
    if _session_judge is not None:
        _session_judge.stop()
        _session_judge = None
    if _run_dir is not None:  # the temporary artifacts and models of this session
        shutil.rmtree(_run_dir, ignore_errors=True)
        _run_dir = None
