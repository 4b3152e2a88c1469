"""Execute notebooks in order and store their deterministic outputs and their figures.

    COURSE_ARTIFACTS=/tmp/scratch/artifacts python tools/store_outputs.py 01_*.ipynb 02_*.ipynb

Each notebook runs top to bottom in a fresh kernel, in the environment the tests
check it in (root conftest.py, `notebook_environment`): the offline model, one judge
run, the inline plotting backend and the stand-in judge (COURSE_REAL_JUDGE=1 keeps
your own Ollama). Set a scratch COURSE_ARTIFACTS first: the notebooks hand their
artifacts on through it, so store them in order. Stored outputs are cleared first,
so a failed run writes nothing.

Afterwards, in cells tagged `nbval-ignore-output` or `nbval-skip`, only the figures
(image outputs) are kept: the text that varies (timings, machine paths, model
output) goes, the pictures stay, so the course reads well on GitHub before anything
runs (nbval does not compare images). Other outputs that name a machine path are
reported.
"""

import importlib.util
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
VOLATILE_TAGS = {"nbval-ignore-output", "nbval-skip"}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")
MACHINE_PATH = re.compile(r"(/tmp/|/home/|/root/|/Users/|/work/|[A-Z]:\\\\)")


def keep_figures_only(cell) -> None:
    """Keep only the image outputs of a cell whose text varies from run to run."""
    kept = []
    for output in cell.outputs:
        images = {k: v for k, v in output.get("data", {}).items() if k in IMAGE_TYPES}
        if output.get("output_type") in ("display_data", "execute_result") and images:
            kept.append(nbformat.v4.new_output("display_data", data=images))
    cell.outputs = kept
    cell.execution_count = None


def store(path: Path) -> list[str]:
    """Run one notebook and store its outputs; returns the problems found in them."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)  # timestamps of this run
        if set(cell.metadata.get("tags", [])) & VOLATILE_TAGS:
            keep_figures_only(cell)
            continue
        for output in cell.outputs:
            text = str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
            if MACHINE_PATH.search(text):
                problems.append(f"cell {index}: stored output names a machine path: {text[:120]!r}")
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    for problem in problems:
        print(f"{path.name}: {problem}  (tag the cell nbval-ignore-output or print less)")
    print(f"stored {path.name}")
    return problems


def main(names: list[str]) -> int:
    # the root conftest.py by its path ("conftest" may name tests/conftest.py under pytest)
    spec = importlib.util.spec_from_file_location("course_root_conftest", ROOT / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    judge = conftest.notebook_environment(os.environ)
    try:
        for name in names:
            store(Path(name).resolve())
    finally:
        if judge is not None:
            judge.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
