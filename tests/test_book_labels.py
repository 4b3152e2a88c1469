"""Labels a reader needs before running anything: what made the stored outputs, and the book's.

The stored outputs of notebooks 04 and 06-10 come from the offline model (random
weights) and, in notebook 09, from the tests' stand-in judge. Each says so in a banner
at the top of its first cell, and the cells whose output is cleared or comes from the
stand-in have the book's own output beside them (the next cell).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the notebooks whose stored outputs come from the offline model
OFFLINE_OUTPUT_NOTEBOOKS = ("04", "05", "06", "07", "08", "09", "10")  # 11, 12: beyond the book

# (notebook, a line of the code cell) whose next cell shows what the book's run printed
BOOK_OUTPUT_BESIDE = [
    ("04", "response_text = (\n    generated_text[len(input_text) :]"),
    ("09", 'helpers.query_model("What do Llamas eat?"'),
    ("09", 'print(">>", helpers.query_model(prompt, JUDGE_MODEL, url=judge_url))'),
    ("10", 'print("  Policy (after DPO):  ", answers["policy"][i])'),
]


def notebook_cells(prefix: str) -> list[dict]:
    (path,) = ROOT.glob(f"{prefix}_*.ipynb")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if isinstance(cell["source"], list):
            cell["source"] = "".join(cell["source"])
    return cells


def stored_text(cells: list[dict]) -> str:
    texts = []
    for cell in cells:
        for output in cell.get("outputs", []):
            texts.append("".join(output.get("text", "")))
            texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


@pytest.mark.parametrize("prefix", OFFLINE_OUTPUT_NOTEBOOKS)
def test_a_banner_at_the_top_says_what_made_the_stored_outputs(prefix):
    cells = notebook_cells(prefix)
    stored = stored_text(cells).lower()
    assert "offline" in stored, f"notebook {prefix} stores no output of the offline model"
    first = next(c for c in cells if c["cell_type"] == "markdown")
    top = [line for line in first["source"].splitlines() if line.strip()][:3]
    banners = [line for line in top if line.startswith(">") and "offline model" in line]
    assert banners, (
        f"notebook {prefix}: no banner naming the offline model in the first lines of its "
        f"first cell: {top}"
    )
    assert "the book's own output" in banners[0]
    if "stand-in" in stored:  # the tests' judge made some of the stored outputs
        assert "stand-in judge" in banners[0], f"notebook {prefix}: banner omits the stand-in"


@pytest.mark.parametrize(
    "prefix, code",
    BOOK_OUTPUT_BESIDE,
    ids=[f"{p}-{i}" for i, (p, _) in enumerate(BOOK_OUTPUT_BESIDE)],
)
def test_the_book_output_stands_beside_the_cell(prefix, code):
    cells = notebook_cells(prefix)
    found = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and code in c["source"]]
    assert len(found) == 1, f"notebook {prefix}: {len(found)} code cells contain {code!r}"
    beside = cells[found[0] + 1]
    assert beside["cell_type"] == "markdown"
    assert re.search(r"\*\*The book's run\b", beside["source"]), beside["source"][:200]
    # what the book printed: a block of its own, or (a long reply) quoted in the text
    shown = re.search(r"^```\n.+?\n```$", beside["source"], re.M | re.S)
    quoted = re.search(r'"[^"\n]{20,}"', beside["source"])
    assert shown or quoted, f"notebook {prefix}: the book's output is named but not shown"
