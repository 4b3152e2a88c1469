"""The Google Colab cells of the notebooks, and the script that puts them there.

    python tools/colab_cell.py           # insert or update the cells (and the README's links)
    python tools/colab_cell.py --check   # only report notebooks whose cells are missing or old

Every notebook gets, right after its title, a short note with an "Open in Colab" link
and the Colab set-up cell (about ten lines): on Colab it clones the course if it is not
there yet, changes into it and calls `course.colab.setup`, which installs what Colab
lacks and, if asked, keeps artifacts/ on Google Drive; anywhere else it does nothing
and prints nothing. Notebook 09 also gets a one-call cell, `course.colab.start_ollama`,
that installs and starts Ollama on the Colab machine and pulls the judge model
(after the parameters cell and the prose that follows it).

The course's GitHub location is set in ONE place, REPOSITORY below. Instructors set it
to their copy of the course (for example "my-school/llm-finetuning-course") and run this
script again: it rewrites the cells in all the notebooks and the README's Colab links.
Running it twice changes nothing the second time.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

# Where the course lives on GitHub ("owner/name") and which branch Colab opens.
# "OWNER/REPO" is the placeholder until an instructor sets it.
REPOSITORY = "OWNER/REPO"
BRANCH = "main"

PLACEHOLDER = "OWNER/REPO"
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"  # the nine, and the bonus notebooks 10 and 11
SCORING_NOTEBOOK_PREFIX = "09_"

SETUP_TAG = "colab-setup"
OLLAMA_TAG = "colab-ollama"
README_START = "<!-- colab-links:start -->"
README_END = "<!-- colab-links:end -->"


def clone_url(repository: str | None = None) -> str:
    """The URL `git clone` fetches the course from."""
    return f"https://github.com/{repository or REPOSITORY}.git"


def colab_link(notebook_name: str, repository: str | None = None, branch: str | None = None) -> str:
    """The address that opens a notebook of the repository on Colab."""
    repository, branch = repository or REPOSITORY, branch or BRANCH
    return f"https://colab.research.google.com/github/{repository}/blob/{branch}/{notebook_name}"


# The set-up cell: __URL__, __BRANCH__ and __FOLDER__ are filled in by setup_cell_source().
# The work is done by course/colab.py (setup); the cell only gets the course there first.
SETUP_CELL = """\
# Google Colab set-up: fetch the course and install what Colab lacks. Elsewhere it does nothing.
import os
import sys

COURSE_REPOSITORY = "__URL__"
if "google.colab" in sys.modules:
    if not os.path.exists("helpers.py"):  # not in the course folder yet: fetch it, go there
        clone = f"GIT_TERMINAL_PROMPT=0 git clone -q -b __BRANCH__ {COURSE_REPOSITORY}"
        if not os.path.isdir("__FOLDER__") and os.system(clone) != 0:
            raise RuntimeError(f"Could not clone {COURSE_REPOSITORY}: set it to the course's URL")
        os.chdir("__FOLDER__")
    sys.path.insert(0, os.getcwd())
    import course.colab

    course.colab.setup(keep_artifacts_on_drive=False)  # True: keep artifacts/ on Google Drive
"""

SETUP_NOTE = """\
**On Google Colab?** [Open this notebook in Colab](__LINK__), choose a GPU runtime \
(*Runtime → Change runtime type*) and run the next cell first: it fetches the course files \
and installs what Colab lacks (`course/colab.py` does the work). Each notebook gets its own \
Colab machine, so change it to `keep_artifacts_on_drive=True` to keep `artifacts/` on Google \
Drive: that is how the notebooks hand their results to each other on Colab, and how a run \
continues after a disconnect. Anywhere else the cell does nothing."""

# Notebook 09 only, after its parameters cell (it uses JUDGE_MODEL), see ollama_index().
OLLAMA_CELL = """\
# Google Colab only: install and start Ollama and pull the judge model. Elsewhere: nothing.
import course.colab

course.colab.start_ollama(JUDGE_MODEL)
"""

OLLAMA_NOTE = """\
**On Google Colab**, the next cell does this for you (`course.colab.start_ollama`): it \
installs Ollama on the Colab machine, starts it and pulls the judge model `JUDGE_MODEL`. \
The book's judge is llama3 (8B parameters); the book says it needs about 16 GB of RAM \
and suggests `phi3` (3.8B) for smaller machines (set `COURSE_JUDGE_MODEL=phi3`). Ollama's \
4-bit llama3 is a 4.7 GB download; on a Colab GPU it runs next to GPT-2 medium, on a CPU \
runtime it is slow. Anywhere else the cell does nothing: install and start \
Ollama yourself (https://ollama.com, then `ollama serve` and `ollama pull llama3`)."""


def folder_name(url: str) -> str:
    """The folder `git clone` makes for a URL: ".../REPO.git" -> "REPO"."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".git")] if name.endswith(".git") else name


def setup_cell_source(url: str | None = None, branch: str | None = None) -> str:
    """The exact source of the Colab set-up cell (`url`: where git clones the course from)."""
    url, branch = url or clone_url(), branch or BRANCH
    return (
        SETUP_CELL.replace("__URL__", url)
        .replace("__BRANCH__", branch)
        .replace("__FOLDER__", folder_name(url))
        .rstrip("\n")
    )


def setup_note_source(notebook_name: str) -> str:
    """The markdown note before the set-up cell, with this notebook's Colab link."""
    return SETUP_NOTE.replace("__LINK__", colab_link(notebook_name))


def ollama_cell_source() -> str:
    """The exact source of notebook 09's Ollama cell."""
    return OLLAMA_CELL.rstrip("\n")


def find_notebooks(root: str | Path = ROOT) -> list[Path]:
    """The course notebooks, in order."""
    return sorted(Path(root).glob(NOTEBOOK_GLOB))


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _find(nb, tag: str, cell_type: str) -> int | None:
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == cell_type and tag in _tags(cell):
            return index
    return None


def _new_cell(nb, cell_type: str, source: str, tag: str, cell_id: str):
    if cell_type == "code":
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": [tag]})
    else:
        cell = nbformat.v4.new_markdown_cell(source, metadata={"tags": [tag]})
    if nb.nbformat == 4 and nb.nbformat_minor >= 5:
        cell.id = cell_id
    else:
        cell.pop("id", None)
    return cell


def _put(nb, index: int, cell_type: str, source: str, tag: str, cell_id: str) -> bool:
    """Update the tagged cell's source, or insert it at `index`. True if anything changed."""
    existing = _find(nb, tag, cell_type)
    if existing is None:
        nb.cells.insert(index, _new_cell(nb, cell_type, source, tag, cell_id))
        return True
    if nb.cells[existing].source != source:
        nb.cells[existing].source = source
        if cell_type == "code":  # what the old cell printed is not what this one prints
            nb.cells[existing].outputs = []
            nb.cells[existing].execution_count = None
        return True
    return False


def parameters_index(nb) -> int:
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in _tags(cell):
            return index
    raise ValueError('no code cell is tagged "parameters"')


def ollama_index(nb) -> int:
    """Where notebook 09's Ollama cells go: after the parameters cell and the prose that
    follows it, but before the prose that introduces the next code cell."""
    params = parameters_index(nb)
    index = params + 1
    while index < len(nb.cells) and nb.cells[index].cell_type != "code":
        index += 1
    if index - 1 > params and nb.cells[index - 1].cell_type == "markdown":
        index -= 1
    return index


def apply_to_notebook(nb, name: str) -> bool:
    """Insert or update the Colab cells of one notebook (in memory). True if it changed."""
    changed = False
    start = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    # the note and the set-up cell go together, right after the title
    changed |= _put(nb, start, "markdown", setup_note_source(name), SETUP_TAG, "colab-setup-note")
    note = _find(nb, SETUP_TAG, "markdown")
    changed |= _put(nb, note + 1, "code", setup_cell_source(), SETUP_TAG, "colab-setup")
    if name.startswith(SCORING_NOTEBOOK_PREFIX):
        changed |= _put(
            nb, ollama_index(nb), "markdown", OLLAMA_NOTE, OLLAMA_TAG, "colab-ollama-note"
        )
        note = _find(nb, OLLAMA_TAG, "markdown")
        changed |= _put(nb, note + 1, "code", ollama_cell_source(), OLLAMA_TAG, "colab-ollama")
    return changed


def problems_in_notebook(nb, name: str) -> list[str]:
    """What is missing or out of date in one notebook's Colab cells."""
    problems = []
    expected = [("code", SETUP_TAG, setup_cell_source(), "Colab set-up cell")]
    expected.append(("markdown", SETUP_TAG, setup_note_source(name), "Colab note"))
    if name.startswith(SCORING_NOTEBOOK_PREFIX):
        expected.append(("code", OLLAMA_TAG, ollama_cell_source(), "Ollama cell"))
        expected.append(("markdown", OLLAMA_TAG, OLLAMA_NOTE, "Ollama note"))
    for cell_type, tag, source, what in expected:
        index = _find(nb, tag, cell_type)
        if index is None:
            problems.append(f"{name}: has no {what}")
        elif nb.cells[index].source != source:
            problems.append(f"{name}: its {what} (cell {index}) is not the current one")
    setup = _find(nb, SETUP_TAG, "code")
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    if setup is not None and setup != first_code:
        problems.append(f"{name}: the Colab set-up cell is not the first code cell")
    if name.startswith(SCORING_NOTEBOOK_PREFIX):
        ollama = _find(nb, OLLAMA_TAG, "code")
        try:
            params = parameters_index(nb)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        else:
            if ollama is not None and ollama < params:
                problems.append(f"{name}: the Ollama cell comes before the parameters cell")
    return problems


def readme_links(names: list[str]) -> str:
    """The README's list of "Open in Colab" links, between its markers."""
    lines = [README_START, "| notebook | |", "| --- | --- |"]
    for name in names:
        lines.append(f"| `{name}` | [Open in Colab]({colab_link(name)}) |")
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: Path, names: list[str]) -> bool:
    """Rewrite the links between the README's markers. True if it changed."""
    if not readme.exists():
        return False
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    new = pattern.sub(lambda _: readme_links(names), text)
    if new == text:
        return False
    readme.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None, root: str | Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing, report problems")
    args = parser.parse_args(argv)
    root = Path(root)
    notebooks = find_notebooks(root)
    if not notebooks:
        print(f"No notebooks ({NOTEBOOK_GLOB}) in {root}.")
        return 1
    if PLACEHOLDER in REPOSITORY:
        print(
            f'Note: REPOSITORY is still the placeholder "{PLACEHOLDER}" (set it in {Path(__file__).name}).'
        )
    status = 0
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        if args.check:
            problems = problems_in_notebook(nb, path.name)
            for problem in problems:
                print(problem)
            status |= bool(problems)
            continue
        try:
            changed = apply_to_notebook(nb, path.name)
        except ValueError as exc:
            print(f"{path.name}: {exc}; add one, then run this script again.")
            status = 1
            continue
        if changed:
            nbformat.write(nb, path)
        print(f"{path.name}: {'updated' if changed else 'already current'}")
    if not args.check and update_readme(root / "README.md", [p.name for p in notebooks]):
        print("README.md: Colab links updated")
    if len(notebooks) not in (9, 10, 11):
        print(f"Found {len(notebooks)} notebooks, the course has nine (and the bonus 10 and 11).")
    return status


if __name__ == "__main__":
    sys.exit(main())
