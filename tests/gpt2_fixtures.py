"""The offline GPT-2 checkpoint's seven files, written once per test session.

Writing it imports TensorFlow (a few seconds), so every test module that needs the
files shares one copy under pytest's session temporary folder.
"""

from __future__ import annotations

import pytest

import helpers
from course import weights


@pytest.fixture(scope="session")
def offline_gpt2_files(tmp_path_factory) -> dict[str, bytes]:
    """{file name: bytes} of the offline checkpoint (course.weights.write_offline_gpt2)."""
    # a fixed folder under the session's base temp: modules importing this fixture
    # share it, and write_offline_gpt2 keeps files that are already there
    model_dir = tmp_path_factory.getbasetemp() / "offline-gpt2-source"
    weights.write_offline_gpt2(model_dir)
    files = {name: (model_dir / name).read_bytes() for name in helpers.GPT2_FILES}
    assert all(files.values()), "write_offline_gpt2 wrote an empty file"
    return files
