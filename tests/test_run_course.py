"""run_course.py against small made-up notebooks, fake artifacts and a stand-in judge.

The real nine notebooks are not run here (the README's test command runs them through
nbval); these notebooks only record what the runner gave them.
"""

import contextlib
import io
import json
import re
import socket
from pathlib import Path

import nbformat
import pytest

import helpers
import run_course


def write_notebook(path: Path, *sources: str, title: str = "# A notebook") -> Path:
    """A notebook with a markdown title and one code cell per source."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(title)]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, path)
    return path


RECORD = """\
import json, os
from pathlib import Path
record = Path(os.environ["COURSE_ARTIFACTS"]) / "record.jsonl"
with open(record, "a") as f:
    f.write(json.dumps({{"notebook": "{name}", "cwd": os.getcwd(),
        "epochs": os.environ.get("COURSE_EPOCHS"), "model": os.environ.get("COURSE_MODEL"),
        "mask": os.environ.get("COURSE_MASK_INSTRUCTIONS")}}) + "\\n")
print("ran {name}")"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(artifacts: Path) -> list[dict]:
    lines = (artifacts / "record.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_passing_chain_runs_in_order_in_the_root_with_the_options(tmp_path, capsys):
    root, artifacts = tmp_path / "course", tmp_path / "out"
    root.mkdir()
    names = ["01_first.ipynb", "02_second.ipynb", "03_third.ipynb"]
    for name in reversed(names):  # created out of order: the runner sorts
        write_notebook(root / name, RECORD.format(name=name))
    write_notebook(root / "10_not_a_step.ipynb", "raise SystemExit('must not run')")

    argv = ["--offline", "--epochs", "3", "--mask-instructions", "--artifacts", str(artifacts)]
    assert run_course.main(argv, root=root) == 0

    ran = records(artifacts)
    assert [r["notebook"] for r in ran] == names
    assert {r["cwd"] for r in ran} == {str(root)}
    assert {(r["epochs"], r["model"], r["mask"]) for r in ran} == {("3", "offline", "true")}
    out = capsys.readouterr().out
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s+\d+\.\d s$", out, re.M), out
        executed = nbformat.read(artifacts / "executed" / name, as_version=4)
        assert executed.cells[1].outputs[0]["text"] == f"ran {name}\n"
    assert "10_not_a_step" not in out
    assert "Summary" in out and "offline (tiny)" in out


def test_a_failing_cell_stops_the_run_and_is_named_with_its_error(tmp_path, capsys):
    root, artifacts = tmp_path / "course", tmp_path / "out"
    root.mkdir()
    write_notebook(root / "01_fine.ipynb", RECORD.format(name="01"))
    write_notebook(
        root / "02_broken.ipynb",
        RECORD.format(name="02"),
        "values = [1, 2, 3]\nvalues[7]",
        RECORD.format(name="02-after"),
    )
    write_notebook(root / "03_never.ipynb", RECORD.format(name="03"))

    assert run_course.main(["--artifacts", str(artifacts)], root=root) == 1

    out = capsys.readouterr().out
    assert "02_broken.ipynb failed in cell 2 (counting from 0): values = [1, 2, 3]" in out
    assert "IndexError: list index out of range" in out
    assert "Summary" not in out
    assert [r["notebook"] for r in records(artifacts)] == ["01", "02"]
    executed = nbformat.read(artifacts / "executed" / "02_broken.ipynb", as_version=4)
    assert executed.cells[2].outputs[-1]["ename"] == "IndexError"
    assert not (artifacts / "executed" / "03_never.ipynb").exists()


def test_run_notebook_reports_a_dead_kernel(tmp_path):
    path = write_notebook(tmp_path / "01_dies.ipynb", "import os\nos._exit(3)")
    run = run_course.run_notebook(
        path, tmp_path / "executed", dict(run_course.os.environ), cwd=tmp_path
    )
    assert not run.ok
    assert run.cell_index == 1 and run.cell_first_line == "import os"
    assert run.ename == "DeadKernelError"


def test_the_summary_is_read_from_the_artifacts(tmp_path, ollama_standin):
    stem = helpers.model_file_stem("gpt2-small")
    log = {  # the keys notebook 05 writes
        "model": "gpt2-small (124M)",
        "device": "cuda",
        "precision": "bf16",
        "config": {"batch_size": 8, "num_epochs": 2},
        "initial_losses": {"train": 3.8, "val": 3.7},
        "train_losses": [3.8, 1.2, 0.4],
        "val_losses": [3.7, 1.0, 0.7],
        "final_losses": {"train": 0.41, "val": 0.73},
        "duration_minutes": 1.5,
    }
    (tmp_path / f"{stem}-training-log.json").write_text(json.dumps(log))
    right = {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."}
    wrong = {"instruction": "Add 2 and 2.", "input": "", "output": "Four."}
    responses = [
        {**right, "model_response": "Blue is a colour."},
        {**wrong, "model_response": "The sky at night."},
        {**wrong, "model_response": "Four."},
    ]
    (tmp_path / f"{stem}-instruction-data-with-response.json").write_text(json.dumps(responses))
    # the scores file as notebook 09 writes it, scored by the stand-in judge (word overlap)
    with contextlib.redirect_stderr(io.StringIO()):
        helpers.generate_model_scores(
            responses, "model_response", scores_path=tmp_path / f"{stem}-scores.json"
        )

    summary = run_course.read_summary(tmp_path, "gpt2-small")
    assert summary["device"] == "cuda" and summary["precision"] == "bf16"
    assert summary["train_loss"] == 0.41 and summary["val_loss"] == 0.73
    assert summary["training_minutes"] == 1.5
    assert summary["responses"] == 3
    assert summary["average_score"] == pytest.approx(200 / 3) and summary["scored"] == 3

    text = run_course.format_summary(summary)
    assert "gpt2-small (124M)" in text and "cuda, bf16" in text
    assert "train 0.410, val 0.730" in text and "1.50 min" in text
    assert "responses written  3" in text
    assert "average 66.67 over 3 responses (judge llama3:latest)" in text

    other = run_course.format_summary(run_course.read_summary(tmp_path, "gpt2-large"))
    assert "notebook 05 has not run" in other and "notebook 09 has not run" in other


def test_without_network_and_weights_it_says_so_before_running_anything(tmp_path, capsys):
    root = tmp_path / "course"
    root.mkdir()
    for name in ("01_data.ipynb", "04_load.ipynb", "05_train.ipynb"):
        write_notebook(root / name, RECORD.format(name=name))
    tried = []

    def no_network(host, port):
        tried.append((host, port))
        return False

    argv = ["--model", "gpt2-small", "--models-dir", str(tmp_path / "gpt2")]
    argv += ["--artifacts", str(tmp_path / "out")]
    assert run_course.main(argv, root=root, connect=no_network) == 2

    out = capsys.readouterr().out
    assert "GPT-2 124M weights are not in" in out and "no network" in out
    assert "python run_course.py --offline" in out
    assert {host for host, _ in tried} == {
        "openaipublic.blob.core.windows.net",
        "f001.backblazeb2.com",
        "huggingface.co",
    }
    assert not (tmp_path / "out" / "record.jsonl").exists()


def test_the_weights_check_passes_when_cached_reachable_offline_or_not_needed(tmp_path):
    def no_network(host, port):
        return False

    def network(host, port):
        return True

    assert run_course.weights_problem("offline", tmp_path, no_network) is None
    assert run_course.weights_problem("gpt2-medium", tmp_path, network) is None
    cached = tmp_path / "355M"
    cached.mkdir()
    for name in helpers.GPT2_FILES[:-1]:
        (cached / name).write_text("x")
    assert "355M" in run_course.weights_problem("gpt2-medium", tmp_path, no_network)
    (cached / helpers.GPT2_FILES[-1]).write_text("x")
    assert run_course.weights_problem("gpt2-medium", tmp_path, no_network) is None


def test_the_judge_check_speaks_to_ollama(ollama_standin):
    assert run_course.judge_problem("llama3", ollama_standin.url) is None
    assert run_course.judge_problem("llama3:latest", ollama_standin.url) is None
    missing = run_course.judge_problem("mistral", ollama_standin.url)
    assert "ollama pull mistral" in missing and "python run_course.py --only 09" in missing
    port = free_port()
    nobody = run_course.judge_problem("llama3", f"127.0.0.1:{port}", timeout=2)
    assert nobody.startswith(f"No Ollama server answers at http://127.0.0.1:{port}")
    assert "ollama serve" in nobody


def test_without_a_judge_notebook_09_is_skipped_and_the_summary_says_what_to_start(
    tmp_path, capsys, monkeypatch
):
    root, artifacts = tmp_path / "course", tmp_path / "out"
    root.mkdir()
    write_notebook(root / "08_look.ipynb", RECORD.format(name="08"))
    write_notebook(root / "09_score.ipynb", RECORD.format(name="09"))
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")

    assert run_course.main(["--artifacts", str(artifacts), "--from", "8"], root=root) == 0

    out = capsys.readouterr().out
    assert re.search(r"^09_score.ipynb\s+skipped: no judge$", out, re.M)
    assert "judge score        not scored:\n    No Ollama server answers at" in out
    assert "ollama serve" in out and "python run_course.py --only 09" in out
    assert [r["notebook"] for r in records(artifacts)] == ["08"]


def test_only_and_from_select_notebooks():
    notebooks = [Path(f"0{i}_step.ipynb") for i in range(1, 10)]
    names = [p.name[:2] for p in run_course.select_notebooks(notebooks, only="07,8")]
    assert names == ["07", "08"]
    assert [p.name[:2] for p in run_course.select_notebooks(notebooks, start="05")] == [
        "05",
        "06",
        "07",
        "08",
        "09",
    ]
    assert run_course.select_notebooks(notebooks, only="03_step") == [Path("03_step.ipynb")]
    with pytest.raises(ValueError, match="--only 12: no such notebook"):
        run_course.select_notebooks(notebooks, only="12")


def test_options_become_course_variables(tmp_path):
    args = run_course.parse_args(
        ["--model", "gpt2-large", "--judge-model", "phi3", "--batch-size", "4", "--lr", "1e-4"]
        + ["--device", "cpu", "--precision", "fp32", "--prompt-style", "phi3"]
        + ["--artifacts", str(tmp_path / "a")]
    )
    env = run_course.course_settings(args, base={"COURSE_EPOCHS": "1", "OTHER": "kept"})
    assert env["COURSE_MODEL"] == "gpt2-large" and env["COURSE_JUDGE_MODEL"] == "phi3"
    assert env["COURSE_BATCH_SIZE"] == "4" and env["COURSE_LR"] == "1e-4"
    assert env["COURSE_DEVICE"] == "cpu" and env["COURSE_PRECISION"] == "fp32"
    assert env["COURSE_PROMPT_STYLE"] == "phi3" and env["COURSE_EPOCHS"] == "1"
    assert env["COURSE_ARTIFACTS"] == str(tmp_path / "a") and env["OTHER"] == "kept"
    assert "COURSE_MASK_INSTRUCTIONS" not in env
    with pytest.raises(SystemExit):
        run_course.parse_args(["--model", "gpt5"])
    with pytest.raises(SystemExit):
        run_course.parse_args(["--offline", "--model", "gpt2-small"])
