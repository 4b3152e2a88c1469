"""The course's layout: helpers.py is the book's code alone, course/ runs beside it.

- helpers.py imports nothing from the course package (not even inside a function),
  and stays short enough to read in one sitting next to the book;
- every module of the course package imports;
- every listing of chapter 7 can be read in the stored notebook that teaches it:
  written in a code cell, or its source shown in a cell's stored output.
"""

from __future__ import annotations

import ast
import html
import importlib
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELPERS = ROOT / "helpers.py"


def is_course(module_name: str | None) -> bool:
    return module_name is not None and (
        module_name == "course" or module_name.startswith("course.")
    )


def course_imports(source: str) -> list[str]:
    """Every import of the course package in `source`, anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}" for a in node.names if is_course(a.name)
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and is_course(node.module):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):  # importlib.import_module("course.x"), __import__
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            first = node.args[0] if node.args else None
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and is_course(first.value)
            ):
                found.append(f"line {node.lineno}: {name}({first.value!r})")
    return sorted(found, key=lambda line: int(line.split(":")[0].split()[1]))


def test_the_import_check_finds_course_imports_anywhere():
    source = (
        "import os\n"
        "def f():\n    from course.speed import forward\n"
        "class A:\n    def g(self):\n        import course.judge as j\n"
        "x = __import__('course')\n"
        "import coursework\n"  # another package with a similar name is fine
    )
    assert course_imports(source) == [
        "line 3: from course.speed import ...",
        "line 6: import course.judge",
        "line 7: __import__('course')",
    ]


def test_helpers_imports_nothing_from_the_course_package():
    assert course_imports(HELPERS.read_text(encoding="utf-8")) == []
    # and importing it loads none of the package's modules
    check = (
        "import sys, helpers; "
        "print([m for m in sys.modules if m == 'course' or m.startswith('course.')])"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_helpers_is_short_enough_to_read_in_one_sitting():
    lines = HELPERS.read_text(encoding="utf-8").count("\n")
    assert lines < 800, f"helpers.py has {lines} lines"


def course_modules() -> list[str]:
    import course

    return sorted(f"course.{m.name}" for m in pkgutil.iter_modules(course.__path__))


def test_the_course_package_has_its_modules():
    assert {
        "course.settings",
        "course.artifacts",
        "course.data",
        "course.weights",
        "course.hardware",
        "course.speed",
        "course.training",
        "course.judge",
        "course.scores",
    } <= set(course_modules())


@pytest.mark.parametrize("module", course_modules())
def test_every_course_module_imports(module):
    imported = importlib.import_module(module)
    assert imported.__doc__, f"{module} has no docstring saying what it is for"


# --- the chapter's listings in the stored notebooks ---------------------------------


def notebook(prefix: str) -> Path:
    found = sorted(ROOT.glob(f"{prefix}_*.ipynb"))
    assert len(found) == 1, f"expected one notebook {prefix}_*.ipynb, found {found}"
    return found[0]


def output_text(output: dict) -> str:
    """The text a stored output shows: printed text, or a result's text forms."""
    if output.get("output_type") == "stream":
        text = output.get("text", "")
        return "".join(text) if isinstance(text, list) else text
    parts = []
    for kind, value in output.get("data", {}).items():
        value = "".join(value) if isinstance(value, list) else value
        if kind in ("text/plain", "text/markdown", "text/x-python"):
            parts.append(value)
        elif kind == "text/html":  # highlighted code: the text without its tags
            parts.append(html.unescape(re.sub(r"<[^>]+>", "", value)))
    return "\n".join(parts)


def code_cells(path: Path) -> list[tuple[str, str]]:
    """(source, stored output text) of each code cell."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    result = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = cell["source"]
        source = "".join(source) if isinstance(source, list) else source
        outputs = "\n".join(output_text(o) for o in cell.get("outputs", []))
        result.append((source, outputs))
    return result


def defines(name: str) -> re.Pattern:
    """The definition of `name` (a function or a class), as written or as printed."""
    return re.compile(rf"^\s*(def|class)\s+{re.escape(name)}\s*[(:]", re.MULTILINE)


BOOK_RESPONSE_LOOP = re.compile(r"\bfor\b[^\n]*\bin\b")

# (notebook, listing, what must be readable there): a pattern that the source or the
# stored output of one code cell must contain
LISTINGS = [
    ("01", "7.1 download_and_load_file", [defines("download_and_load_file")]),
    ("01", "7.2 format_input", [defines("format_input")]),
    ("01", "7.3 the 85/10/5 split", [re.compile(r"int\(len\(\w+\)\s*\*\s*0\.85\)")]),
    ("02", "7.4 InstructionDataset", [defines("InstructionDataset")]),
    ("02", "7.5 custom_collate_fn", [defines("custom_collate_fn")]),
    ("03", "7.6 the data loaders", [re.compile(r"\bDataLoader\(")]),
    ("04", "7.7 download_and_load_gpt2", [defines("download_and_load_gpt2")]),
    ("04", "7.7 load_weights_into_gpt", [defines("load_weights_into_gpt")]),
    ("05", "7.8 train_model_simple", [defines("train_model_simple")]),
    (
        "07",
        "7.9 the book's response loop (generate, then extract)",
        [
            BOOK_RESPONSE_LOOP,
            re.compile(r"(?<![\w.])generate\(|helpers\.generate\("),
            # the book's extraction: cut the prompt off, drop the response marker
            re.compile(r"extract_response\(|\[len\(input_text\)\s*:\s*\]\.replace\("),
        ],
    ),
    ("09", "7.10 query_model", [defines("query_model")]),
    ("09", "7.11 generate_model_scores", [defines("generate_model_scores")]),
]


@pytest.mark.parametrize(
    "prefix, listing, patterns",
    LISTINGS,
    ids=[f"{n}-" + re.sub(r"\W+", "-", what).strip("-")[:40] for n, what, _ in LISTINGS],
)
def test_each_listing_is_readable_in_its_stored_notebook(prefix, listing, patterns):
    path = notebook(prefix)
    for source, outputs in code_cells(path):
        for text in (source, outputs):
            if all(p.search(text) for p in patterns):
                return
    pytest.fail(
        f"{path.name}: no code cell shows listing {listing} (written in the cell, or its "
        f"source printed in a stored output): looked for {[p.pattern for p in patterns]}"
    )


def test_the_listing_check_reads_sources_and_stored_outputs(tmp_path):
    cell = {
        "cell_type": "code",
        "source": ["import inspect\n", "print(inspect.getsource(helpers.format_input))"],
        "outputs": [
            {"output_type": "stream", "name": "stdout", "text": ["def format_input(entry):\n"]}
        ],
    }
    html_cell = {
        "cell_type": "code",
        "source": "Code(inspect.getsource(helpers.query_model))",
        "outputs": [
            {
                "output_type": "execute_result",
                "data": {
                    "text/html": ['<span class="k">def</span> <span>query_model</span>(prompt)']
                },
            }
        ],
    }
    path = tmp_path / "x.ipynb"
    path.write_text(
        json.dumps(
            {"cells": [cell, html_cell, {"cell_type": "markdown", "source": "def generate("}]}
        )
    )
    cells = code_cells(path)
    assert len(cells) == 2
    assert defines("format_input").search(cells[0][1])
    assert not defines("format_input").search(cells[0][0])  # a call is not the code
    assert defines("query_model").search(cells[1][1])
