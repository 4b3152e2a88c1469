"""Shared test set-up.

Before any notebook kernel starts, point the course at the offline model and at a
fresh artifacts folder, so `pytest --nbval` runs the nine notebooks with no network
and never touches a student's own artifacts/.
"""

import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("COURSE_MODEL", "offline")
    run_dir = tempfile.mkdtemp(prefix="course-tests-")
    os.environ.setdefault("COURSE_ARTIFACTS", os.path.join(run_dir, "artifacts"))
    os.environ.setdefault("COURSE_MODELS_DIR", os.path.join(run_dir, "gpt2"))
    os.environ.setdefault("MPLBACKEND", "Agg")
