"""Notebook 01 with a damaged shipped instruction-data.json, as a student meets it.

The course is copied to a temporary folder, its instruction-data.json is cut short
there, and notebook 01 runs top to bottom in a fresh kernel. Listing 7.1 still runs
on the shipped copy: it must say what is wrong and what to do, and with COURSE_DATASET
pointing at a valid file the notebook must go on to the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "01_dataset_download_and_formatting.ipynb"


def copy_course(destination: Path) -> Path:
    """The course without its tests, other notebooks, artifacts or caches."""

    def ignore(folder, names):
        skipped = {"artifacts", "gpt2", "tests", "benchmarks", "__pycache__"}
        return [
            n
            for n in names
            if n in skipped
            or n.startswith(".")
            or (n.endswith(".ipynb") and n != NOTEBOOK and Path(folder) == ROOT)
        ]

    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


def run_notebook(folder: Path):
    nb = nbformat.read(folder / NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    try:
        client.execute()
        return nb, None
    except CellExecutionError as err:
        return nb, err


def output_of(nb, starts_with: str) -> str:
    cell = next(c for c in nb.cells if c.cell_type == "code" and starts_with in c.source)
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


@pytest.fixture
def damaged_course(tmp_path, monkeypatch):
    course = copy_course(tmp_path / "course")
    shipped = course / "instruction-data.json"
    valid = tmp_path / "my-data.json"
    shutil.copy(shipped, valid)
    shipped.write_bytes(shipped.read_bytes()[:300])  # cut short, as an interrupted copy
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("COURSE_DATA_LIMIT", raising=False)
    return course, valid


def test_a_damaged_shipped_copy_is_reported_and_the_notebook_goes_on(damaged_course, monkeypatch):
    course, valid = damaged_course
    monkeypatch.setenv("COURSE_DATASET", str(valid))

    nb, error = run_notebook(course)

    assert error is None, f"notebook 01 stopped: {error}"
    listing = output_of(nb, "helpers.download_and_load_file(file_path, url)")
    assert "Listing 7.1 could not load instruction-data.json: JSONDecodeError" in listing
    assert "Delete instruction-data.json and run this cell again" in listing
    assert "so the notebook goes on" in listing
    saved = output_of(nb, "split = course.data.save_split(data)")
    assert "Saved split-" in saved and "{'train': 935, 'val': 55, 'test': 110}" in saved


def test_with_the_books_data_the_damage_stops_with_a_message_naming_the_file(
    damaged_course, monkeypatch
):
    course, _ = damaged_course
    monkeypatch.setenv("COURSE_DATASET", "book")

    nb, error = run_notebook(course)

    listing = output_of(nb, "helpers.download_and_load_file(file_path, url)")
    assert "Listing 7.1 could not load instruction-data.json" in listing
    assert "so the next cell stops too" in listing
    assert error is not None and error.ename == "DatasetError", error
    assert "instruction-data.json" in error.evalue
