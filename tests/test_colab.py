"""Google Colab: the set-up cells (tools/colab_cell.py), what they call (course/colab.py),
and the script that puts the cells into the notebooks.

Nothing here goes to the network, and the code runs for real against stand-ins of what
Colab has: a `google.colab` module (its `drive.mount` records the call and makes the
folder, as Colab's does), a git repository reached through a file:// URL (cloned by the
real git), and stand-in `pip`, `ollama`, `curl` and `apt-get` commands that this file
writes and puts first on PATH. The script runs on copies of the notebooks in a temporary
folder, never on the course's own notebooks.
"""

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from course import artifacts, colab
from tools import colab_cell

ROOT = Path(__file__).resolve().parent.parent
COURSE_NAMES = [
    "01_dataset_download_and_formatting.ipynb",
    "02_batching_the_dataset.ipynb",
    "03_creating_data_loaders.ipynb",
    "04_loading_a_pretrained_llm.ipynb",
    "05_instruction_finetuning.ipynb",
    "06_inspecting_the_modeling_loss.ipynb",
    "07_extracting_responses.ipynb",
    "08_qualitative_evaluation.ipynb",
    "09_scoring_the_responses.ipynb",
]


def run_cell(source: str, namespace: dict | None = None) -> str:
    """Execute a cell's source as the kernel would; return what it printed."""
    namespace = {} if namespace is None else namespace
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<notebook cell>", "exec"), namespace)
    return out.getvalue()


def write_command(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def colab_module(monkeypatch):
    """A stand-in `google.colab` in sys.modules; `.mounts` lists the drive.mount calls."""
    google = types.ModuleType("google")
    module = types.ModuleType("google.colab")
    drive = types.ModuleType("google.colab.drive")
    module.mounts = []

    def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
        module.mounts.append(mountpoint)
        (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)
        print(f"Mounted at {mountpoint}")

    drive.mount = mount
    module.drive = drive
    google.colab = module
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", module)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    return module


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A folder first on PATH for stand-in commands; OLLAMA_HOST on a free port."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{port}")
    yield folder
    pid_file = folder / "serve.pid"  # stop a stand-in `ollama serve` the test started
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


@pytest.fixture
def fake_pip(fake_bin, monkeypatch):
    """course.colab installs with a stand-in pip that records its arguments."""
    record = f'echo "pip $*" >> "{fake_bin}/calls.log"\n'
    pip = write_command(fake_bin, "pip", f"#!/bin/sh\n{record}")
    monkeypatch.setattr(colab, "PIP", [str(pip)])
    return fake_bin


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fresh 'Colab machine': cwd is an empty folder; sys.path, modules and env restored."""
    content = tmp_path / "content"
    content.mkdir()
    monkeypatch.chdir(content)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("COURSE_ARTIFACTS", raising=False)
    return content


@pytest.fixture
def course_repo(tmp_path):
    """A git repository holding a small course with the real course/colab.py; its URL."""
    repo = tmp_path / "upstream" / "instruction-course"
    (repo / "course").mkdir(parents=True)
    (repo / "helpers.py").write_text('WHERE = "fetched from the repository"\n')
    (repo / "course" / "__init__.py").write_text('"""The clone\'s course package."""\n')
    shutil.copy(ROOT / "course" / "colab.py", repo / "course" / "colab.py")
    git = ["git", "-c", "user.name=Course", "-c", "user.email=course@example.org"]
    subprocess.run(["git", "init", "--quiet", "-b", "main", str(repo)], check=True)
    subprocess.run(git + ["-C", str(repo), "add", "."], check=True)
    subprocess.run(git + ["-C", str(repo), "commit", "--quiet", "-m", "course"], check=True)
    return repo.as_uri()


@pytest.fixture
def fresh_course_import(monkeypatch):
    """Forget the imported `course` package, so a cell imports the clone's."""
    for name in [n for n in sys.modules if n == "course" or n.startswith("course.")]:
        monkeypatch.delitem(sys.modules, name)


# ---------------------------------------------------------------------------
# The set-up cell
# ---------------------------------------------------------------------------


def test_off_colab_the_setup_cell_does_nothing_and_prints_nothing(machine, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    before = dict(os.environ)
    assert run_cell(colab_cell.setup_cell_source()) == ""
    assert Path.cwd() == machine and list(machine.iterdir()) == []
    assert dict(os.environ) == before


def test_on_colab_it_clones_the_course_goes_there_and_sets_up(
    machine, colab_module, course_repo, fresh_course_import
):
    source = colab_cell.setup_cell_source(course_repo)

    printed = run_cell(source)

    course = machine / "instruction-course"
    assert Path.cwd() == course
    assert (course / "helpers.py").read_text() == 'WHERE = "fetched from the repository"\n'
    assert sys.path[0] == str(course)
    assert sys.modules["course.colab"].__file__ == str(course / "course" / "colab.py")
    assert f"Course files: {course}" in printed  # printed by the clone's course.colab.setup
    assert "Installed:    nothing (Colab has it all)" in printed
    assert "setup(keep_artifacts_on_drive=True) keeps them on Google Drive" in printed
    assert colab_module.mounts == [] and "COURSE_ARTIFACTS" not in os.environ

    # run again (same kernel), and again after a restart (back in the start folder):
    # the clone is reused, local edits stay
    (course / "helpers.py").write_text("edited = True\n")
    run_cell(source)
    assert Path.cwd() == course
    os.chdir(machine)
    run_cell(source)
    assert Path.cwd() == course and (course / "helpers.py").read_text() == "edited = True\n"


def test_a_placeholder_or_unreachable_repository_gives_a_clear_error(
    machine, colab_module, monkeypatch, tmp_path
):
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "file")  # git refuses https: no network here
    with pytest.raises(RuntimeError, match="Could not clone https://github.com/OWNER/REPO.git"):
        run_cell(colab_cell.setup_cell_source())
    missing = (tmp_path / "no-such-repository").as_uri()
    with pytest.raises(RuntimeError, match=f"Could not clone {missing}: set it"):
        run_cell(colab_cell.setup_cell_source(missing))
    assert Path.cwd() == machine and list(machine.iterdir()) == []


# ---------------------------------------------------------------------------
# course.colab.setup
# ---------------------------------------------------------------------------


def test_setup_does_nothing_off_colab(fake_pip, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(colab, "REQUIRED", {"course_test_no_such_module": "no-such-package"})
    colab.setup(keep_artifacts_on_drive=True)
    assert capsys.readouterr().out == "" and calls(fake_pip) == []


def test_setup_installs_only_what_is_missing(colab_module, fake_pip, monkeypatch, capsys):
    required = {"tiktoken": "tiktoken", "course_test_no_such_module": "no-such-package"}
    monkeypatch.setattr(colab, "REQUIRED", required)
    colab.setup()
    assert calls(fake_pip) == ["pip install --quiet no-such-package"]
    out = capsys.readouterr().out
    assert "Installing no-such-package ..." in out and "Installed:    no-such-package" in out

    write_command(
        fake_pip, "pip", "#!/bin/sh\necho 'ERROR: No matching distribution' >&2\nexit 1\n"
    )
    with pytest.raises(RuntimeError, match="pip could not install no-such-package"):
        colab.setup()


def test_artifacts_can_live_on_google_drive(machine, colab_module, fake_pip, monkeypatch):
    drive = machine / "drive"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        colab.setup(keep_artifacts_on_drive=True, mountpoint=str(drive))
    on_drive = drive / "MyDrive" / f"{colab.COURSE_ROOT.name}-artifacts"
    assert colab_module.mounts == [str(drive)]
    assert os.environ["COURSE_ARTIFACTS"] == str(on_drive) and on_drive.is_dir()
    assert f"Artifacts:    {on_drive} (on Google Drive)" in out.getvalue()
    assert artifacts.artifacts_dir() == on_drive  # the notebooks' artifacts go there
    assert calls(fake_pip) == []


# ---------------------------------------------------------------------------
# course.colab.start_ollama (notebook 09's Ollama cell)
# ---------------------------------------------------------------------------

FAKE_OLLAMA = """\
#!{python}
# stand-in for the ollama command: `serve` answers /api/version on OLLAMA_HOST's port
import http.server, json, os, sys
from urllib.parse import urlparse
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.log"), "a") as f:
    f.write(" ".join(["ollama"] + sys.argv[1:]) + "\\n")
if sys.argv[1] == "serve":
    with open(os.path.join(here, "serve.pid"), "w") as f:
        f.write(str(os.getpid()))
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({{"version": "0.6.8"}}).encode()
            self.send_response(200 if self.path == "/api/version" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    port = urlparse(os.environ["OLLAMA_HOST"]).port
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
if sys.argv[1:] == ["pull", "no-such-model"]:
    print("Error: pull model manifest: file does not exist", file=sys.stderr)
    sys.exit(1)
print("pulling manifest\\nsuccess")
"""


def fake_ollama() -> str:
    return FAKE_OLLAMA.format(python=sys.executable)


def installer_stand_ins(fake_bin: Path) -> None:
    """curl prints an install script that puts the stand-in ollama in place, as install.sh
    does; apt-get only records its call."""
    (fake_bin / "ollama.txt").write_text(fake_ollama())
    record = f'echo "$(basename "$0") $*" >> "{fake_bin}/calls.log"\n'
    install = f'cp "{fake_bin}/ollama.txt" "{fake_bin}/ollama" && chmod +x "{fake_bin}/ollama"'
    write_command(fake_bin, "curl", f"#!/bin/sh\n{record}echo '{install}'\n")
    write_command(fake_bin, "apt-get", f"#!/bin/sh\n{record}")


def test_off_colab_the_ollama_cell_does_nothing(fake_bin, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    write_command(fake_bin, "ollama", fake_ollama())
    assert run_cell(colab_cell.ollama_cell_source(), {"JUDGE_MODEL": "llama3"}) == ""
    assert calls(fake_bin) == []


def test_on_colab_the_ollama_cell_starts_the_server_and_pulls_the_judge(colab_module, fake_bin):
    write_command(fake_bin, "ollama", fake_ollama())
    printed = run_cell(colab_cell.ollama_cell_source(), {"JUDGE_MODEL": "llama3"})
    assert calls(fake_bin) == ["ollama serve", "ollama pull llama3"]
    assert f"Ollama is running at {os.environ['OLLAMA_HOST']}." in printed
    assert "llama3 is ready" in printed

    # run again: the server is up, so only the pull is repeated (Ollama skips what it has)
    colab.start_ollama("llama3")
    assert calls(fake_bin) == ["ollama serve", "ollama pull llama3", "ollama pull llama3"]
    with pytest.raises(RuntimeError, match="(?s)ollama pull no-such-model failed.*does not exist"):
        colab.start_ollama("no-such-model")


def test_on_colab_ollama_is_installed_first(colab_module, fake_bin):
    assert shutil.which("ollama") is None, "this test needs a machine without ollama"
    installer_stand_ins(fake_bin)
    write_command(fake_bin, "zstd", "#!/bin/sh\n")
    write_command(fake_bin, "lspci", "#!/bin/sh\n")

    colab.start_ollama("phi3")

    assert calls(fake_bin) == [
        "curl -fsSL https://ollama.com/install.sh",
        "ollama serve",
        "ollama pull phi3",
    ]


def test_zstd_and_pciutils_are_installed_when_missing(colab_module, fake_bin, monkeypatch):
    installer_stand_ins(fake_bin)
    # a PATH where only the stand-ins and the basic tools are found, so zstd and lspci are not
    basics = fake_bin / "basics"
    basics.mkdir()
    for tool in ("sh", "cp", "chmod", "basename", "cat"):
        os.symlink(shutil.which(tool), basics / tool)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{basics}")

    colab.start_ollama("llama3")

    assert calls(fake_bin)[:3] == [
        "apt-get update -qq",
        "apt-get install -y -qq zstd pciutils",
        "curl -fsSL https://ollama.com/install.sh",
    ]


def test_a_server_that_does_not_start_is_reported_with_its_log(colab_module, fake_bin, monkeypatch):
    write_command(fake_bin, "ollama", "#!/bin/sh\necho 'Error: could not bind' >&2\nexit 1\n")
    monkeypatch.setattr(colab, "OLLAMA_START_SECONDS", 1)
    with pytest.raises(RuntimeError, match=r"Ollama did not start within 1 s: see .*ollama.log"):
        colab.start_ollama("llama3")


# ---------------------------------------------------------------------------
# The script that puts the cells into the notebooks (on copies only)
# ---------------------------------------------------------------------------


def make_course(root: Path) -> None:
    """Nine notebooks shaped like the course's: title, parameters cell, more cells."""
    root.mkdir(parents=True, exist_ok=True)
    for name in COURSE_NAMES:
        nb = nbformat.v4.new_notebook()
        parameters = nbformat.v4.new_code_cell(
            'from course.settings import setting\nJUDGE_MODEL = setting("COURSE_JUDGE_MODEL")',
            metadata={"tags": ["parameters"]},
        )
        nb.cells = [
            nbformat.v4.new_markdown_cell(f"# {name}"),
            nbformat.v4.new_markdown_cell("The settings:"),
            parameters,
            nbformat.v4.new_code_cell("print('step')"),
        ]
        if name.startswith("09_"):
            nb.cells[3:3] = [
                nbformat.v4.new_markdown_cell("## 1. Installing Ollama"),
                nbformat.v4.new_markdown_cell("## 2. Is the judge ready?"),
            ]
        nbformat.write(nb, root / name)
    readme = f"# Course\n\n{colab_cell.README_START}\nold\n{colab_cell.README_END}\n\nMore.\n"
    (root / "README.md").write_text(readme)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_the_script_inserts_the_cells_once_and_updates_them_in_place(tmp_path, monkeypatch):
    root = tmp_path / "course"
    make_course(root)
    assert colab_cell.main(["--check"], root=root) == 1

    assert colab_cell.main([], root=root) == 0
    for name in COURSE_NAMES:
        nb = nbformat.read(root / name, as_version=4)
        nbformat.validate(nb)
        assert colab_cell.problems_in_notebook(nb, name) == []
        assert nb.cells[1].source == colab_cell.setup_note_source(name)
        assert nb.cells[2].source == colab_cell.setup_cell_source()
        assert colab_cell.colab_link(name) in nb.cells[1].source
        assert "parameters" in nb.cells[4].metadata["tags"]
        assert len(nb.cells) == (10 if name.startswith("09_") else 6)
    # in 09: after the parameters cell and the prose about installing Ollama
    nb09 = nbformat.read(root / COURSE_NAMES[-1], as_version=4)
    assert [c.source for c in nb09.cells[5:9]] == [
        "## 1. Installing Ollama",
        colab_cell.OLLAMA_NOTE,
        colab_cell.ollama_cell_source(),
        "## 2. Is the judge ready?",
    ]
    assert colab_cell.main(["--check"], root=root) == 0

    before = snapshot(root)
    assert colab_cell.main([], root=root) == 0
    assert snapshot(root) == before  # idempotent: nothing changes the second time

    # an instructor sets the repository: cells, links and README change, nothing is added
    monkeypatch.setattr(colab_cell, "REPOSITORY", "test-owner/renamed-course")
    assert colab_cell.main(["--check"], root=root) == 1
    assert colab_cell.main([], root=root) == 0
    for name in COURSE_NAMES:
        nb = nbformat.read(root / name, as_version=4)
        assert len(nb.cells) == (10 if name.startswith("09_") else 6)
        cell = nb.cells[2].source
        assert 'COURSE_REPOSITORY = "https://github.com/test-owner/renamed-course.git"' in cell
        assert 'os.path.isdir("renamed-course")' in cell and 'os.chdir("renamed-course")' in cell
        assert "github/test-owner/renamed-course/blob/main/" + name in nb.cells[1].source
    readme = (root / "README.md").read_text()
    assert "old" not in readme and readme.endswith("\n\nMore.\n")
    link = "https://colab.research.google.com/github/test-owner/renamed-course/blob/main/"
    assert readme.count(link) == 9


def test_an_old_colab_cell_is_replaced_and_its_outputs_cleared(tmp_path):
    root = tmp_path / "course"
    make_course(root)
    colab_cell.main([], root=root)
    path = root / COURSE_NAMES[0]
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].source = "# Google Colab set-up: an old, 64-line version\nprint('old')"
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="old\n")]
    nb.cells[2].execution_count = 1
    nbformat.write(nb, path)
    assert colab_cell.main([], root=root) == 0
    cell = nbformat.read(path, as_version=4).cells[2]
    assert cell.source == colab_cell.setup_cell_source()
    assert cell.outputs == [] and cell.execution_count is None


def test_the_check_names_a_notebook_without_the_cells(tmp_path, capsys):
    root = tmp_path / "course"
    make_course(root)
    colab_cell.main([], root=root)
    nb = nbformat.read(root / COURSE_NAMES[4], as_version=4)
    del nb.cells[2]
    nbformat.write(nb, root / COURSE_NAMES[4])
    assert colab_cell.main(["--check"], root=root) == 1
    assert f"{COURSE_NAMES[4]}: has no Colab set-up cell" in capsys.readouterr().out


def test_notebook_09_needs_a_parameters_cell(tmp_path, capsys):
    root = tmp_path / "course"
    make_course(root)
    nb = nbformat.read(root / COURSE_NAMES[-1], as_version=4)
    nb.cells[2].metadata["tags"] = []
    nbformat.write(nb, root / COURSE_NAMES[-1])
    assert colab_cell.main([], root=root) == 1
    assert 'no code cell is tagged "parameters"' in capsys.readouterr().out


def test_the_script_works_on_copies_of_the_course_notebooks(tmp_path):
    """The notebooks in the repository as they are now (10 included, if it is there),
    with the script applied to copies in a temporary folder."""
    root = tmp_path / "course"
    root.mkdir()
    originals = colab_cell.find_notebooks(ROOT)
    assert [p.name for p in originals][:9] == COURSE_NAMES
    for path in originals:
        shutil.copy(path, root / path.name)
    before = {p.name: p.read_bytes() for p in originals}
    assert colab_cell.main([], root=root) == 0
    for path in colab_cell.find_notebooks(root):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert colab_cell.problems_in_notebook(nb, path.name) == []
        assert nb.cells[0].cell_type == "markdown"
        setup = next(c for c in nb.cells if c.cell_type == "code")
        assert setup.source == colab_cell.setup_cell_source() and setup.outputs == []
    assert colab_cell.main(["--check"], root=root) == 0
    assert {p.name: p.read_bytes() for p in originals} == before  # the originals untouched


def test_every_course_notebook_carries_the_current_colab_cells(machine, monkeypatch):
    """Fails until `python tools/colab_cell.py` has been run on the course's notebooks."""
    notebooks = colab_cell.find_notebooks(ROOT)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        problems = colab_cell.problems_in_notebook(nb, path.name)
        assert problems == [], "run `python tools/colab_cell.py` to put the current cells in"
        setup = next(c for c in nb.cells if c.cell_type == "code")
        assert setup.outputs == []  # off Colab it prints nothing, so nbval compares nothing
        assert run_cell(setup.source) == ""


def test_the_readme_links_every_notebook():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in colab_cell.find_notebooks(ROOT):
        assert colab_cell.colab_link(path.name) in text
    assert "tools/colab_cell.py" in text


def test_the_cells_are_short_lines_of_python():
    setup, ollama = colab_cell.setup_cell_source(), colab_cell.ollama_cell_source()
    for source in (setup, ollama):
        compile(source, "<cell>", "exec")
        assert all(len(line) <= 100 for line in source.splitlines())
        assert source.startswith("# Google Colab") and not source.endswith("\n")
    code_lines = [line for line in setup.splitlines() if line.strip()]
    assert len(code_lines) <= 13  # "about ten lines": the work is in course/colab.py
    assert "course.colab.setup(" in setup and "course.colab.start_ollama(JUDGE_MODEL)" in ollama
    assert len([line for line in ollama.splitlines() if line.strip()]) == 3
