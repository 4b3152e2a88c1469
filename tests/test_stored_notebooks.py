"""What the committed notebooks must hold before anything runs: pictures, questions, no paths.

nbval compares text outputs but not images, so these checks read the stored .ipynb
files themselves: every cell that draws a figure keeps its image (the course reads
well on GitHub and in JupyterLab before a cell runs), every notebook ends with
questions whose answers are folded away, and no stored output names this machine.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("[01][0-9]_*.ipynb"))
# a cell draws a figure when it calls one of these
DRAWS = re.compile(
    r"\bplt\.(subplots|figure|show|plot|bar|hist|imshow)\(|\bplot_losses\(|\.imshow\("
)


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_there_are_the_nine_notebooks_and_the_bonus():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{n:02d}" for n in range(1, 13)]


def plotting_cells(path: Path) -> list[tuple[int, dict]]:
    return [
        (index, cell)
        for index, cell in enumerate(cells(path))
        if cell["cell_type"] == "code" and DRAWS.search(source(cell))
    ]


def test_the_notebooks_draw_figures():
    # the check below means something only if it finds the course's plots
    drawing = [p.name[:2] for p in NOTEBOOKS if plotting_cells(p)]
    for expected in ("02", "03", "06", "09", "10"):
        assert expected in drawing, f"no plotting cell found in notebook {expected}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_plotting_cell_stores_its_image(path):
    missing = [
        f"cell {index}: {source(cell).strip().splitlines()[0][:60]}"
        for index, cell in plotting_cells(path)
        if not any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))
    ]
    assert not missing, f"{path.name}: plotting cells without a stored image: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_notebook_ends_with_a_summary_and_questions_with_folded_answers(path):
    markdown = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    assert re.search(r"^## Summary", markdown, re.M), f"{path.name} has no summary"
    assert "## Questions" in markdown, f"{path.name} has no '## Questions' section"
    questions = re.split(
        r"^## (?!Questions)", markdown[markdown.find("## Questions") :], flags=re.M
    )[0]
    numbered = {int(n) for n in re.findall(r"^\s*(\d+)\. ", questions, re.M)}
    assert numbered and max(numbered) >= 5, f"{path.name}: fewer than 5 questions"
    assert "<details>" in questions, f"{path.name}: the answers are not folded in <details>"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_stored_outputs_name_no_machine_path(path):
    found = []
    for index, cell in enumerate(cells(path)):
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", "")) + "".join(
                "".join(v) for k, v in output.get("data", {}).items() if k.startswith("text/")
            )
            for pattern in ("/tmp/", "/root/", "/work/", "/home/"):
                if pattern in text:
                    found.append(f"cell {index}: {pattern}")
    assert not found, f"{path.name} stores machine paths: {found}"
