"""Exercise 7.4 in one pass of notebook 05 with COURSE_FINETUNE=lora, as a student runs it.

The folded solution is pasted into the scaffold, and the notebook runs top to bottom in
one kernel: the chapter's training cell trains with the course's solution (the exercise
comes later), and the exercise's last cell trains the run again with the student's
layer, to the same losses; the training log says whose code trained it. Run from the
top once more in the same kernel, the notebook trains nothing new.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_exercise_lora import NB05, notebook_cells

from course import data

ROOT = Path(__file__).resolve().parent.parent


def text_of(cell) -> str:
    return "".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for output in cell.outputs
    )


def cell_with_id(nb, cell_id: str):
    return next(cell for cell in nb.cells if cell.get("id") == cell_id)


def run_all(client, nb) -> dict:
    """Run every cell in the client's kernel; the text each code cell printed, by id."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.outputs = []
            client.execute_cell(cell, index)
    return {cell.get("id"): text_of(cell) for cell in nb.cells if cell.cell_type == "code"}


@pytest.fixture
def lora_course(tmp_path, monkeypatch):
    """The environment of a small LoRA run: the offline model, 40 entries, one epoch."""
    for name, value in {
        "COURSE_MODEL": "offline",
        "COURSE_FINETUNE": "lora",
        "COURSE_EPOCHS": "1",
        "COURSE_DATA_LIMIT": "40",
        "COURSE_ARTIFACTS": str(tmp_path / "artifacts"),
        "COURSE_MODELS_DIR": str(tmp_path / "gpt2"),
    }.items():
        monkeypatch.setenv(name, value)
    data.save_split(data.load_course_data(show_progress=False))  # notebook 01's split
    return tmp_path / "artifacts"


def test_one_pass_ends_with_the_students_layer_having_trained_the_run(lora_course):
    nb = nbformat.read(NB05, as_version=4)
    solution = notebook_cells()[1]
    cell_with_id(nb, "nb05-lora-scaffold").source = solution  # pasted into the scaffold
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    with client.setup_kernel():
        first = run_all(client, nb)
        (log_path,) = lora_course.glob("*-lora-training-log.json")
        sft_path = log_path.with_name(log_path.name.replace("-training-log.json", "-sft.pth"))
        log_after_first = log_path.read_bytes()
        sft_after_first = sft_path.stat().st_mtime_ns
        second = run_all(client, nb)

    # the first pass: the course's solution in the chapter's flow, then the student's
    assert "LoRA trains with the course's solution" in first["nb05-cell-19"]
    assert "trains this run again with your layer" in first["nb05-cell-19"]
    assert first["nb05-lora-check"].startswith("Exercise 7.4: right.")
    yours = first["nb05-lora-train-yours"]
    assert "LoRA trained with your LinearWithLoRA and replace_linear_with_lora" in yours
    losses = re.search(
        r"yours train ([\d.]+), validation ([\d.]+); the course's solution train ([\d.]+), "
        r"validation ([\d.]+)",
        yours,
    )
    assert losses is not None, yours
    assert losses.group(1, 2) == losses.group(3, 4)  # a correct layer: the same run
    assert json.loads(log_after_first)["config"]["lora_code"] == "yours"

    # the second pass, same kernel: the student's layer goes in, nothing trains again
    assert "LoRA trains with your LinearWithLoRA" in second["nb05-cell-19"]
    assert (
        "Your LinearWithLoRA and replace_linear_with_lora trained this run already"
        in (second["nb05-lora-train-yours"])
    )
    assert "LoRA trained with your" not in second["nb05-lora-train-yours"]
    assert log_path.read_bytes() == log_after_first
    assert sft_path.stat().st_mtime_ns == sft_after_first
    assert not (lora_course / "replaced").exists()  # no run was moved aside
