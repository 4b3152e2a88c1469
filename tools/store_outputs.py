"""Execute notebooks in order and store only their deterministic outputs.

    python tools/store_outputs.py 01_*.ipynb 02_*.ipynb

Each notebook runs top to bottom in a fresh kernel (with the current environment,
so set COURSE_MODEL=offline and a scratch COURSE_ARTIFACTS first). Afterwards the
outputs of cells tagged `nbval-ignore-output` or `nbval-skip` are cleared, so the
stored notebook carries no timings, machine paths or model-dependent text.
"""

import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

VOLATILE_TAGS = {"nbval-ignore-output", "nbval-skip"}
MACHINE_PATH = re.compile(r"(/tmp/|/home/|/root/|/Users/|/work/|[A-Z]:\\\\)")


def store(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)  # timestamps of this run
        tags = set(cell.metadata.get("tags", []))
        if tags & VOLATILE_TAGS:
            cell.outputs = []
            cell.execution_count = None
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


if __name__ == "__main__":
    for name in sys.argv[1:]:
        store(Path(name))
