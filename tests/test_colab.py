"""The Colab cells (tools/colab_cell.py) and the script that puts them into the notebooks.

The set-up cell runs here exactly as written, with a stand-in `google.colab` module
(its `drive.mount` records the call and makes the folder, as Colab's does), a local
git repository reached through a file:// URL, and pip replaced by a recorder: nothing
goes to the network. The Ollama cell runs against stand-in `ollama`, `curl` and
`apt-get` commands put first on PATH.
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

import helpers  # the course's, imported before a cell puts a clone first on sys.path
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


@pytest.fixture
def colab(monkeypatch):
    """A stand-in `google.colab` in sys.modules; `colab.mounts` lists drive.mount calls."""
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
def course_repo(tmp_path):
    """A git repository holding a minimal course, and its file:// URL."""
    repo = tmp_path / "upstream" / "instruction-course"
    repo.mkdir(parents=True)
    (repo / "helpers.py").write_text('WHERE = "fetched from the repository"\n')
    (repo / "README.md").write_text("# The course\n")
    git = ["git", "-c", "user.name=Course", "-c", "user.email=course@example.org"]
    subprocess.run(["git", "init", "--quiet", "-b", "main", str(repo)], check=True)
    subprocess.run(git + ["-C", str(repo), "add", "."], check=True)
    subprocess.run(git + ["-C", str(repo), "commit", "--quiet", "-m", "course"], check=True)
    return repo.as_uri()


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fresh 'Colab machine': cwd is an empty folder, sys.path and env restored after."""
    content = tmp_path / "content"
    content.mkdir()
    monkeypatch.chdir(content)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("COURSE_ARTIFACTS", raising=False)
    return content


@pytest.fixture
def pip(monkeypatch):
    """Replace `pip install` by a recorder (every other command runs for real)."""
    calls = []
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        if isinstance(command, list) and command[1:3] == ["-m", "pip"]:
            calls.append(command[3:])
            return subprocess.CompletedProcess(command, 0, "", "")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def pretend_missing(monkeypatch, *names):
    """Make importlib.util.find_spec report these modules as not installed."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# ---------------------------------------------------------------------------
# The set-up cell
# ---------------------------------------------------------------------------


def test_off_colab_the_setup_cell_does_nothing_and_prints_nothing(machine, pip, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    before = dict(os.environ)
    assert run_cell(colab_cell.setup_cell_source()) == ""
    assert Path.cwd() == machine and list(machine.iterdir()) == []
    assert pip == [] and dict(os.environ) == before


def test_on_colab_it_fetches_the_course_and_installs_only_what_is_missing(
    machine, colab, course_repo, pip, monkeypatch
):
    pretend_missing(monkeypatch, "tiktoken")
    source = colab_cell.setup_cell_source(course_repo)

    printed = run_cell(source)

    course = machine / "instruction-course"
    assert Path.cwd() == course
    assert (course / "helpers.py").read_text() == 'WHERE = "fetched from the repository"\n'
    assert sys.path[0] == str(course)
    assert pip == [["install", "--quiet", "tiktoken"]]
    assert colab.mounts == [] and "COURSE_ARTIFACTS" not in os.environ
    assert f"Course files: {course}" in printed and "Installing tiktoken" in printed
    assert "set KEEP_ARTIFACTS_ON_DRIVE = True" in printed

    # run again (same kernel), and again after a restart (back in the start folder)
    (course / "helpers.py").write_text("edited = True\n")
    run_cell(source)
    assert Path.cwd() == course
    os.chdir(machine)
    run_cell(source)
    assert Path.cwd() == course and (course / "helpers.py").read_text() == "edited = True\n"


def test_nothing_is_installed_when_colab_has_everything(machine, colab, course_repo, pip):
    printed = run_cell(colab_cell.setup_cell_source(course_repo))
    assert pip == [] and "Installing" not in printed


def test_artifacts_can_live_on_google_drive(machine, colab, course_repo, pip):
    source = colab_cell.setup_cell_source(course_repo)
    chosen = source.replace("KEEP_ARTIFACTS_ON_DRIVE = False", "KEEP_ARTIFACTS_ON_DRIVE = True")
    assert chosen != source

    printed = run_cell(chosen)

    drive_artifacts = machine / "drive" / "MyDrive" / "instruction-course-artifacts"
    assert colab.mounts == [str(machine / "drive")]
    assert os.environ["COURSE_ARTIFACTS"] == str(drive_artifacts) and drive_artifacts.is_dir()
    assert f"Artifacts:    {drive_artifacts}" in printed
    # the notebooks' own artifacts_dir() then points there
    assert helpers.artifacts_dir() == drive_artifacts


def test_a_placeholder_or_unreachable_repository_gives_a_clear_error(machine, colab, pip, tmp_path):
    with pytest.raises(RuntimeError, match="placeholder.*tools/colab_cell.py"):
        run_cell(colab_cell.setup_cell_source("https://github.com/OWNER/REPO.git"))
    missing = (tmp_path / "no-such-repository").as_uri()
    with pytest.raises(RuntimeError, match="Could not fetch the course from file://"):
        run_cell(colab_cell.setup_cell_source(missing))
    assert Path.cwd() == machine


# ---------------------------------------------------------------------------
# Notebook 09's Ollama cell
# ---------------------------------------------------------------------------

FAKE_OLLAMA = """\
#!{python}
# stand-in for the ollama command: `serve` answers /api/version on OLLAMA_HOST's port
import http.server, json, os, sys
from urllib.parse import urlparse
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
with open(log, "a") as f:
    f.write(" ".join(["ollama"] + sys.argv[1:]) + "\\n")
if sys.argv[1] == "serve":
    with open(os.path.join(os.path.dirname(log), "serve.pid"), "w") as f:
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
print("pulling manifest\\nsuccess")
"""


def write_command(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A folder first on PATH for stand-in commands; stops a started `ollama serve`."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{port}")
    yield folder
    pid_file = folder / "serve.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_off_colab_the_ollama_cell_does_nothing(fake_bin, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    write_command(fake_bin, "ollama", FAKE_OLLAMA.format(python=sys.executable))
    assert run_cell(colab_cell.ollama_cell_source(), {"JUDGE_MODEL": "llama3"}) == ""
    assert calls(fake_bin) == []


def test_on_colab_the_ollama_cell_starts_the_server_and_pulls_the_judge(colab, fake_bin):
    write_command(fake_bin, "ollama", FAKE_OLLAMA.format(python=sys.executable))
    printed = run_cell(colab_cell.ollama_cell_source(), {"JUDGE_MODEL": "llama3"})
    assert calls(fake_bin) == ["ollama serve", "ollama pull llama3"]
    assert "Ollama is running at http://127.0.0.1:" in printed and "llama3 is ready" in printed

    # run again: the server is up, so only the pull is repeated (Ollama skips what it has)
    run_cell(colab_cell.ollama_cell_source(), {"JUDGE_MODEL": "llama3"})
    assert calls(fake_bin) == ["ollama serve", "ollama pull llama3", "ollama pull llama3"]


def test_on_colab_the_ollama_cell_installs_ollama_first(colab, fake_bin):
    assert shutil.which("ollama") is None, "this test needs a machine without ollama"
    # curl prints an install script that puts the stand-in ollama in place, as install.sh would
    (fake_bin / "ollama.txt").write_text(FAKE_OLLAMA.format(python=sys.executable))
    record = f'echo "$(basename "$0") $*" >> "{fake_bin}/calls.log"\n'
    install = f'cp "{fake_bin}/ollama.txt" "{fake_bin}/ollama" && chmod +x "{fake_bin}/ollama"'
    write_command(fake_bin, "curl", f"#!/bin/sh\n{record}echo '{install}'\n")
    write_command(fake_bin, "apt-get", f"#!/bin/sh\n{record}")
    write_command(fake_bin, "zstd", "#!/bin/sh\n")
    write_command(fake_bin, "lspci", "#!/bin/sh\n")

    run_cell(colab_cell.ollama_cell_source(), {"JUDGE_MODEL": "phi3"})

    assert calls(fake_bin) == [
        "curl -fsSL https://ollama.com/install.sh",
        "ollama serve",
        "ollama pull phi3",
    ]


def test_the_ollama_cell_installs_zstd_and_pciutils_when_missing(colab, fake_bin, monkeypatch):
    write_command(fake_bin, "ollama.txt", FAKE_OLLAMA.format(python=sys.executable))
    record = f'echo "$(basename "$0") $*" >> "{fake_bin}/calls.log"\n'
    install = f'cp "{fake_bin}/ollama.txt" "{fake_bin}/ollama" && chmod +x "{fake_bin}/ollama"'
    write_command(fake_bin, "curl", f"#!/bin/sh\n{record}echo '{install}'\n")
    write_command(fake_bin, "apt-get", f"#!/bin/sh\n{record}")
    # a PATH where only the stand-ins and the basic tools are found, so zstd and lspci are not
    basics = fake_bin / "basics"
    basics.mkdir()
    for tool in ("sh", "cp", "chmod", "basename", "cat"):
        os.symlink(shutil.which(tool), basics / tool)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{basics}")

    run_cell(colab_cell.ollama_cell_source(), {"JUDGE_MODEL": "llama3"})

    assert calls(fake_bin)[:3] == [
        "apt-get update -qq",
        "apt-get install -y -qq zstd pciutils",
        "curl -fsSL https://ollama.com/install.sh",
    ]


# ---------------------------------------------------------------------------
# The script that puts the cells into the notebooks
# ---------------------------------------------------------------------------


def make_course(root: Path) -> None:
    """Nine notebooks shaped like the course's: title, parameters cell, more cells."""
    root.mkdir(parents=True, exist_ok=True)
    for name in COURSE_NAMES:
        nb = nbformat.v4.new_notebook()
        parameters = nbformat.v4.new_code_cell(
            'import helpers\nJUDGE_MODEL = helpers.setting("COURSE_JUDGE_MODEL", "llama3")',
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
        assert (
            'COURSE_REPOSITORY = "https://github.com/test-owner/renamed-course.git"'
            in nb.cells[2].source
        )
        assert "github/test-owner/renamed-course/blob/main/" + name in nb.cells[1].source
    readme = (root / "README.md").read_text()
    assert "old" not in readme and readme.endswith("\n\nMore.\n")
    link = "https://colab.research.google.com/github/test-owner/renamed-course/blob/main/"
    assert readme.count(link) == 9


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
    """The notebooks in the repository as they are now, with the script applied to copies."""
    root = tmp_path / "course"
    make_course(root)
    for path in colab_cell.find_notebooks(ROOT):
        shutil.copy(path, root / path.name)
    assert colab_cell.main([], root=root) == 0
    for path in colab_cell.find_notebooks(root):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert colab_cell.problems_in_notebook(nb, path.name) == []
        assert nb.cells[0].cell_type == "markdown"
    assert colab_cell.main(["--check"], root=root) == 0


def test_every_course_notebook_carries_the_current_colab_cells(machine, pip, monkeypatch):
    """Fails until `python tools/colab_cell.py` has been run on the nine notebooks."""
    notebooks = colab_cell.find_notebooks(ROOT)
    assert [p.name for p in notebooks] == COURSE_NAMES
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
    for name in COURSE_NAMES:
        assert colab_cell.colab_link(name) in text
    assert "tools/colab_cell.py" in text


def test_the_cells_are_short_lines_of_python():
    for source in (colab_cell.setup_cell_source(), colab_cell.ollama_cell_source()):
        compile(source, "<cell>", "exec")
        assert all(len(line) <= 100 for line in source.splitlines())
        assert source.startswith("# Google Colab") and not source.endswith("\n")
