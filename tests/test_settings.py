"""COURSE_* settings: each value is checked where it is read, and all at once before a run.

The cases are the ones that went wrong downstream (issue "bad numbers flow
downstream"): a learning rate of 1e9 trained to NaN weights, -5 new tokens gave empty
responses, -1 epochs saved a "finished" empty run, a generation batch of 0 failed
inside range(), -1 judge runs ended in FileNotFoundError. A notebook's parameters cell
reads them as `setting("COURSE_EPOCHS", 2)`; that call must stop with the variable's
name and what it accepts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from course import settings
from course.settings import SPEC, SettingError, check_all, setting

ROOT = Path(__file__).resolve().parent.parent

# variable, bad value, the notebook's default, words the message must hold
BAD_VALUES = [
    ("COURSE_LR", "1e9", 5e-5, "above 0.0 and at most 1.0"),
    ("COURSE_LR", "0", 5e-5, "above 0.0"),
    ("COURSE_LR", "nan", 5e-5, "above 0.0 and at most 1.0"),
    ("COURSE_LR", "-inf", 5e-5, "above 0.0 and at most 1.0"),
    ("COURSE_MAX_NEW_TOKENS", "-5", 256, "at least 1 and at most 1024"),
    ("COURSE_EPOCHS", "-1", 2, "at least 1 and at most 1000"),
    ("COURSE_EPOCHS", "0", 2, "at least 1 and at most 1000"),
    ("COURSE_EPOCHS", "1.5", 2, "a whole number from 1 to 1000"),
    ("COURSE_GENERATION_BATCH_SIZE", "0", 8, "at least 1 and at most 1024"),
    ("COURSE_JUDGE_RUNS", "-1", 3, "at least 1 and at most 100"),
    ("COURSE_BATCH_SIZE", "eight", 8, "a whole number from 1 to 4096"),
    ("COURSE_WEIGHT_DECAY", "-0.1", 0.1, "at least 0.0 and at most 10.0"),
    ("COURSE_SEED", "-3", 123, "at least 0"),
    ("COURSE_MASK_INSTRUCTIONS", "maybe", False, "use 1 or 0"),
    ("COURSE_PRECISION", "fp8", "auto", "'auto', 'fp32', 'bf16', 'fp16'"),
    ("COURSE_PROMPT_STYLE", "chatml", "alpaca", "'alpaca', 'phi3'"),
    ("COURSE_MODEL", "gpt5", "gpt2-medium (355M)", '"gpt2-small", "gpt2-medium"'),
]


@pytest.mark.parametrize(("name", "raw", "default", "allowed"), BAD_VALUES)
def test_a_bad_value_stops_where_it_is_read(monkeypatch, name, raw, default, allowed):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingError) as caught:
        setting(name, default)  # as a notebook's parameters cell reads it
    message = str(caught.value)
    assert name in message
    assert allowed in message
    assert isinstance(caught.value, ValueError)  # what a plain `except ValueError` catches


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("COURSE_LR", "1e-4", 1e-4),
        ("COURSE_LR", "1", 1.0),
        ("COURSE_EPOCHS", " 3 ", 3),
        ("COURSE_MAX_NEW_TOKENS", "1", 1),
        ("COURSE_JUDGE_RUNS", "1", 1),
        ("COURSE_MASK_INSTRUCTIONS", "yes", True),
        ("COURSE_MODEL", "offline", settings.OFFLINE_MODEL),
        ("COURSE_MODEL", "355M", "gpt2-medium (355M)"),
        ("COURSE_DATA_LIMIT", "0", 0),
    ],
)
def test_good_values_pass(monkeypatch, name, raw, expected):
    monkeypatch.setenv(name, raw)
    assert setting(name) == expected


def test_unset_and_empty_give_the_books_default(monkeypatch):
    monkeypatch.delenv("COURSE_EPOCHS", raising=False)
    assert setting("COURSE_EPOCHS") == 2
    monkeypatch.setenv("COURSE_EPOCHS", "  ")
    assert setting("COURSE_EPOCHS", 2) == 2


def test_the_type_comes_from_spec_not_from_the_cells_default(monkeypatch):
    monkeypatch.setenv("COURSE_WEIGHT_DECAY", "0.05")
    assert setting("COURSE_WEIGHT_DECAY", 0) == 0.05  # a cell written with an int default


def test_every_default_is_allowed():
    for name, (default, accepts) in SPEC.items():
        settings.check_value(name, default, accepts)  # raises if the table contradicts itself


def test_check_all_lists_every_problem_at_once():
    environ = {name: raw for name, raw, _, _ in BAD_VALUES if name != "COURSE_LR"}
    environ["COURSE_LR"] = "1e9"
    environ["COURSE_EPOCHS"] = "-1"
    environ["COURSE_BATCH_SIZE"] = "8"  # a good one among them
    environ["PATH"] = os.environ.get("PATH", "")  # not a course variable: ignored
    problems = check_all(environ)
    bad = sorted(
        name for name in environ if name.startswith("COURSE_") and name != "COURSE_BATCH_SIZE"
    )
    assert len(problems) == len(bad)
    for name in bad:
        assert (
            sum(line.startswith(name + "=") or line.startswith(name + ":") for line in problems)
            == 1
        ), name
    assert check_all({"COURSE_EPOCHS": "1", "COURSE_LR": "5e-5"}) == []


def test_every_course_variable_the_notebooks_read_is_in_spec():
    """A variable outside SPEC would be read with no range check at all."""
    read = set()
    for notebook in sorted(ROOT.glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            source = "".join(cell["source"])
            read |= set(re.findall(r"setting\(\s*[\"'](COURSE_[A-Z_]+)", source))
    for module in sorted((ROOT / "course").glob("*.py")):
        read |= set(re.findall(r"setting\(\s*[\"'](COURSE_[A-Z_]+)", module.read_text()))
    assert {"COURSE_EPOCHS", "COURSE_LR", "COURSE_MODELS_DIR"} <= read  # the search works
    assert sorted(read - set(SPEC)) == []


# -- folders: relative to the course, not to where Jupyter started -------------------


def test_folder_settings_count_from_the_course(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COURSE_MODELS_DIR", raising=False)
    assert setting("COURSE_MODELS_DIR", "gpt2") == str(settings.ROOT / "gpt2")
    assert settings.models_dir() == settings.ROOT / "gpt2"
    monkeypatch.setenv("COURSE_MODELS_DIR", "weights/cache")
    assert settings.models_dir() == settings.ROOT / "weights" / "cache"
    monkeypatch.setenv("COURSE_MODELS_DIR", str(tmp_path / "mine"))
    assert settings.models_dir() == tmp_path / "mine"


def test_a_folder_setting_naming_a_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path / "notes.txt"))
    with pytest.raises(SettingError, match="COURSE_ARTIFACTS.*is a file, not a folder"):
        setting("COURSE_ARTIFACTS")


def copy_course(destination: Path) -> Path:
    """The files a kernel needs to use the course: a copy, so the test writes nothing here."""
    import shutil

    destination.mkdir()
    shutil.copytree(ROOT / "course", destination / "course")
    shutil.copytree(ROOT / "gpt2-tokenizer", destination / "gpt2-tokenizer")
    for name in ("helpers.py", "instruction-data.json"):
        shutil.copy(ROOT / name, destination / name)
    return destination


KERNEL_ELSEWHERE = """
import json
from pathlib import Path
from course import artifacts, data, settings, weights

# the calls the notebooks make, with nothing set
models_dir = settings.setting("COURSE_MODELS_DIR", "gpt2")
weights.load_gpt2("offline", models_dir, source="safetensors")
entries = data.load_instruction_data()
artifacts.write_json(artifacts.path_for("training-log", "offline"), {"ok": True})
print(json.dumps({"entries": len(entries), "models_dir": str(models_dir)}))
"""


def test_a_kernel_started_in_another_folder_uses_the_course_folder(tmp_path):
    course = copy_course(tmp_path / "course-copy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("COURSE_ARTIFACTS", "COURSE_MODELS_DIR")
    }
    env["PYTHONPATH"] = str(course)
    done = subprocess.run(
        [sys.executable, "-c", KERNEL_ELSEWHERE],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entries"] == 1100  # the shipped file, not a download
    assert Path(result["models_dir"]) == course / "gpt2"
    assert (course / "gpt2" / "offline" / "model.safetensors").is_file()
    assert (course / "artifacts" / "offline-training-log.json").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing in the current folder
