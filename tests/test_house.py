"""The house rules of course/: README's "How the course is built" lists every module in
layers, and a module imports only from its own row or the rows above it; no module is
longer than 500 lines and no function longer than 80; each module opens with a docstring.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def house_rows() -> list[set[str]]:
    """The README table's rows, each the set of module names it lists (course.x, helpers, ...)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## How the course is built", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 4 or set(cells[2].strip()) <= {"-", " "} or cells[2].strip() == "module":
            continue
        names = set()
        for path in re.findall(r"`([\w/]+(?:\.py)?/?)`", cells[2]):
            names.add(path.removesuffix(".py").removesuffix("/").replace("/", "."))
        rows.append(names)
    return rows


def course_modules() -> dict[str, Path]:
    """Every module of course/ (packages by their folder name), run_course and helpers."""
    found = {"helpers": ROOT / "helpers.py", "run_course": ROOT / "run_course.py"}
    for path in sorted((ROOT / "course").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(name: str, path: Path) -> set[str]:
    """The course modules (and helpers) that `path` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def row_of(module: str, rows: list[set[str]]) -> int | None:
    """The row listing `module`, or the row listing its package (course.exercises.x)."""
    for number, row in enumerate(rows):
        if module in row or any(module.startswith(listed + ".") for listed in row):
            return number
    return None


def test_the_readme_lists_every_module_once():
    rows, modules = house_rows(), course_modules()
    listed = [name for row in rows for name in row]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    missing = [m for m in modules if m != "course" and row_of(m, rows) is None]
    assert not missing, f"README's 'How the course is built' does not list {missing}"
    stale = [
        n for n in listed if n not in modules and not any(m.startswith(n + ".") for m in modules)
    ]
    assert not stale, f"README lists modules that do not exist: {stale}"


def test_a_module_imports_only_from_its_row_or_the_rows_above():
    rows, modules = house_rows(), course_modules()
    wrong = []
    for name, path in modules.items():
        here = row_of(name, rows)
        if here is None:
            continue
        for other in imported(name, path):
            there = row_of(other, rows)
            if there is not None and there > here and not other.startswith(name + "."):
                wrong.append(f"{name} (row {here}) imports {other} (row {there})")
    assert not wrong, "imports that run down the table:\n" + "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize("folder", ["course", "benchmarks", "tools"])
def test_no_module_over_500_lines_and_no_function_over_80(folder):
    paths = sorted((ROOT / folder).rglob("*.py"))
    if folder == "course":
        paths.append(ROOT / "run_course.py")
    long = []
    for path in paths:
        source = path.read_text(encoding="utf-8")
        if folder != "tools" and len(source.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} has {length} lines")
    assert not long, "\n".join(long)


def test_every_course_module_opens_with_a_short_docstring():
    for name, path in course_modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{path.relative_to(ROOT)} has no module docstring"
        if name not in ("helpers",):  # the book's file introduces the chapter at length
            lines = len(doc.splitlines())
            assert lines <= 5, f"{path.relative_to(ROOT)}: a docstring of {lines} lines, not 2-3"
