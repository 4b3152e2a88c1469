"""run_course.py against small made-up notebooks, artifacts and the stand-in judge.

The real notebooks are not run here (the README's test command runs them through
nbval); these notebooks only record what the runner gave them. Ctrl+C is sent to a
real run_course process, as a terminal sends it.
"""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

import run_course
from course import artifacts, judge, weights

ROOT = Path(__file__).resolve().parent.parent


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
        "mask": os.environ.get("COURSE_MASK_INSTRUCTIONS"),
        "dataset": os.environ.get("COURSE_DATASET"),
        "finetune": os.environ.get("COURSE_FINETUNE")}}) + "\\n")
print("ran {name}")"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(folder: Path) -> list[dict]:
    path = folder / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def course_with(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_notebook(root / name, RECORD.format(name=name))
    return root


def test_a_passing_chain_runs_in_order_in_the_root_with_the_options(tmp_path, capsys):
    root, out = tmp_path / "course", tmp_path / "out"
    names = ["01_first.ipynb", "02_second.ipynb"]
    course_with(root, *reversed(names))  # created out of order: the runner sorts
    write_notebook(root / "10_bonus.ipynb", "raise SystemExit('must not run')")
    data = tmp_path / "my-data.json"
    data.write_text("[]")

    argv = ["--offline", "--epochs", "3", "--mask-instructions", "--artifacts", str(out)]
    argv += ["--dataset", os.path.relpath(data), "--finetune", "lora"]
    assert run_course.main(argv, root=root) == 0

    ran = records(out)
    assert [r["notebook"] for r in ran] == names
    assert {r["cwd"] for r in ran} == {str(root)}
    assert {(r["epochs"], r["model"], r["mask"]) for r in ran} == {("3", "offline", "true")}
    # a relative dataset path is made absolute: the kernels run in the course folder
    assert {(r["dataset"], r["finetune"]) for r in ran} == {(str(data), "lora")}
    printed = capsys.readouterr().out
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s+\d+\.\d s$", printed, re.M), printed
        executed = nbformat.read(out / "executed" / name, as_version=4)
        assert executed.cells[1].outputs[0]["text"] == f"ran {name}\n"
    assert "10_bonus" not in printed  # the bonus notebook runs only when asked
    assert "Summary" in printed and "offline (tiny)" in printed


def test_a_failing_cell_stops_the_run_and_its_copy_shows_no_stale_outputs(tmp_path, capsys):
    root, out = tmp_path / "course", tmp_path / "out"
    course_with(root, "01_fine.ipynb", "03_never.ipynb")
    broken = write_notebook(
        root / "02_broken.ipynb",
        RECORD.format(name="02"),
        "values = [1, 2, 3]\nvalues[7]",
        "print('after')",
    )
    nb = nbformat.read(broken, as_version=4)  # outputs stored by an earlier, good run
    for cell in nb.cells[1:]:
        cell.outputs = [nbformat.v4.new_output("stream", text="stored earlier\n")]
        cell.execution_count = 7
    nbformat.write(nb, broken)

    assert run_course.main(["--artifacts", str(out)], root=root) == 1

    printed = capsys.readouterr().out
    assert "02_broken.ipynb failed in cell 2 (counting from 0): values = [1, 2, 3]" in printed
    assert "IndexError: list index out of range" in printed
    assert "Summary" not in printed
    assert [r["notebook"] for r in records(out)] == ["01_fine.ipynb", "02"]
    executed = nbformat.read(out / "executed" / "02_broken.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"] == "ran 02\n"
    assert executed.cells[2].outputs[-1]["ename"] == "IndexError"
    assert executed.cells[3].outputs == [] and executed.cells[3].execution_count is None
    assert not (out / "executed" / "03_never.ipynb").exists()


def test_run_notebook_reports_a_dead_kernel(tmp_path):
    path = write_notebook(tmp_path / "01_dies.ipynb", "import os\nos._exit(3)")
    run = run_course.run_notebook(path, tmp_path / "executed", dict(os.environ), cwd=tmp_path)
    assert not run.ok and not run.interrupted
    assert run.cell_index == 1 and run.cell_first_line == "import os"
    assert run.ename == "DeadKernelError"


# -- Ctrl+C, as a terminal sends it ---------------------------------------------------


def test_ctrl_c_says_where_to_continue(tmp_path):
    root, out = tmp_path / "course", tmp_path / "out"
    course_with(root, "01_quick.ipynb", "03_after.ipynb")
    started = out / "02-started"
    write_notebook(
        root / "02_long.ipynb",
        f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(120)",
        "print('not reached')",
    )
    script = (
        "import sys; from pathlib import Path; import run_course; "
        f"sys.exit(run_course.main(['--artifacts', {str(out)!r}], root=Path({str(root)!r})))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 90
        while not started.exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "notebook 02 did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl+C: the whole foreground group
        printed, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, printed
    assert re.search(r"^02_long.ipynb\s+interrupted: continue with --from 02$", printed, re.M)
    assert "AssertionError" not in printed and "Traceback" not in printed
    assert [r["notebook"] for r in records(out)] == ["01_quick.ipynb"]
    executed = nbformat.read(out / "executed" / "02_long.ipynb", as_version=4)
    assert executed.cells[1].outputs[-1]["ename"] == "KeyboardInterrupt"
    assert executed.cells[2].outputs == []


# -- checks before anything runs --------------------------------------------------------


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["--precision", "fp8"], {}, ("COURSE_PRECISION=", "fp8", "not allowed", "'bf16'")),
        (["--model", "gpt5"], {}, ("COURSE_MODEL", "Unknown model 'gpt5'")),
        (["--epochs", "-1"], {}, ("COURSE_EPOCHS=", "-1", "out of range")),
        (["--finetune", "qlora"], {}, ("COURSE_FINETUNE=", "qlora", "'lora'")),
        (["--data-limit", "many"], {}, ("COURSE_DATA_LIMIT=", "many")),
        ([], {"COURSE_JUDGE_RUNS": "-1"}, ("COURSE_JUDGE_RUNS=", "-1", "out of range")),
        ([], {"OLLAMA_HOST": "localhost:abc"}, ("OLLAMA_HOST: The address 'localhost:abc'",)),
    ],
)
def test_bad_settings_stop_the_run_before_anything_runs(
    tmp_path, capsys, monkeypatch, argv, env, expected
):
    root, out = tmp_path / "course", tmp_path / "out"
    course_with(root, "01_data.ipynb", "09_score.ipynb")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_course.main(argv + ["--artifacts", str(out)], root=root) == 2
    printed = capsys.readouterr().out
    assert printed.startswith("Nothing was run: these settings cannot be used.\n- ")
    assert all(fragment in printed for fragment in expected), printed
    assert records(out) == [] and not (out / "executed").exists()


def test_ollama_host_is_checked_only_when_notebook_09_runs(tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "course", tmp_path / "out"
    course_with(root, "01_data.ipynb", "09_score.ipynb")
    monkeypatch.setenv("OLLAMA_HOST", "localhost:abc")
    assert run_course.main(["--artifacts", str(out), "--only", "01"], root=root) == 0
    assert [r["notebook"] for r in records(out)] == ["01_data.ipynb"]
    assert "OLLAMA_HOST" not in capsys.readouterr().out


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in, refused by the operating system itself."""
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses new folders
        return Path("/sys/course-test-artifacts")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "artifacts"


def test_an_unwritable_artifacts_folder_is_refused_clearly(tmp_path, capsys):
    root = course_with(tmp_path / "course", "01_data.ipynb")
    folder = unwritable_folder(tmp_path)
    assert run_course.main(["--artifacts", str(folder)], root=root) == 2
    printed = capsys.readouterr().out
    assert printed.startswith("Nothing was run. Cannot write ")
    assert "is not writable" in printed and "--artifacts FOLDER" in printed
    assert "Traceback" not in printed


def test_a_full_disk_is_reported_clearly(tmp_path, capsys):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    root, out = tmp_path / "course", tmp_path / "out"
    (out / "executed").mkdir(parents=True)
    root.mkdir()
    write_notebook(
        root / "01_write.ipynb",
        "import os\nwith open(os.path.join(os.environ['COURSE_ARTIFACTS'], 'full.bin'), 'wb') as f:"
        "\n    f.write(b'x' * 100_000)",
    )
    (out / "full.bin").symlink_to("/dev/full")  # the notebook's artifact
    (out / "executed" / "01_write.ipynb").symlink_to("/dev/full")  # and the executed copy

    assert run_course.main(["--artifacts", str(out)], root=root) == 1

    printed = capsys.readouterr().out
    assert "01_write.ipynb" in printed and "could not save its executed copy" in printed
    assert "The disk is full: could not write" in printed and "No space left" in printed
    assert "--artifacts FOLDER. Then continue with: python run_course.py --from 01" in printed
    assert "Traceback" not in printed
    assert not (out / "executed" / "01_write.ipynb").exists()  # no half-written copy


# -- the summary, read from the artifacts ----------------------------------------------


def test_the_summary_is_read_from_the_artifacts(tmp_path, ollama_standin, monkeypatch):
    env = dict(os.environ, COURSE_ARTIFACTS=str(tmp_path), COURSE_MODEL="gpt2-small")
    env.pop("COURSE_DATASET", None)
    with run_course.environment(env):
        stem = artifacts.run_stem("gpt2-small")
        log = {  # what notebook 05 writes
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
        artifacts.write_json(artifacts.path_for("training-log", stem), log)
        right = {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."}
        wrong = {"instruction": "Add 2 and 2.", "input": "", "output": "Four."}
        responses = [
            {**right, "model_response": "Blue is a colour."},
            {**wrong, "model_response": "The sky at night."},
            {**wrong, "model_response": "Four."},
        ]
        artifacts.write_json(artifacts.path_for("responses", stem), responses)
        # the scores file as notebook 09 writes it: one per judge, scored by the stand-in
        with contextlib.redirect_stderr(io.StringIO()):
            for run in (0, 1):
                judge.generate_model_scores(
                    responses,
                    "model_response",
                    "llama3",
                    artifacts.scores_path(stem, "llama3"),
                    run,
                )
        summary = run_course.read_summary()
        assert summary["device"] == "cuda" and summary["precision"] == "bf16"
        assert summary["train_loss"] == 0.41 and summary["val_loss"] == 0.73
        assert summary["training_minutes"] == 1.5
        assert summary["responses"] == 3
        assert summary["average_score"] == pytest.approx(200 / 3) and summary["scored"] == 3
        assert summary["score_runs"] == 2 and summary["score_std"] == 0

        text = run_course.format_summary(summary)
        assert "gpt2-small (124M)" in text and "cuda, bf16" in text
        assert "train 0.410, val 0.730" in text and "1.50 min" in text
        assert "responses written  3" in text
        assert "average 66.67 ± 0.00 over 3 responses (judge llama3:latest, mean of 2 runs)" in text

        # another judge has no scores yet; a damaged log names itself
        os.environ["COURSE_JUDGE_MODEL"] = "phi3"
        assert "notebook 09 has not run" in run_course.format_summary(run_course.read_summary())
        artifacts.path_for("training-log", stem).write_text('{"device": "cu')
        text = run_course.format_summary(run_course.read_summary())
        assert "no training log" in text and "training-log.json is cut off" in text

        os.environ["COURSE_MODEL"] = "gpt2-large"
        other = run_course.format_summary(run_course.read_summary())
        assert "notebook 05 has not run" in other and "notebook 07 has not run" in other


# -- network and judge checks -----------------------------------------------------------


def test_without_network_and_weights_it_says_so_before_running_anything(tmp_path, capsys):
    root = course_with(tmp_path / "course", "01_data.ipynb", "04_load.ipynb", "05_train.ipynb")
    tried = []

    def no_network(host, port):
        tried.append((host, port))
        return False

    argv = ["--model", "gpt2-small", "--models-dir", str(tmp_path / "gpt2")]
    argv += ["--artifacts", str(tmp_path / "out")]
    assert run_course.main(argv, root=root, connect=no_network) == 2

    printed = capsys.readouterr().out
    assert "GPT-2 124M weights are not in" in printed and "no network" in printed
    assert "python run_course.py --offline" in printed
    assert {host for host, _ in tried} == {
        "openaipublic.blob.core.windows.net",
        "f001.backblazeb2.com",
        "huggingface.co",
    }
    assert records(tmp_path / "out") == []


def test_the_weights_check_passes_when_cached_reachable_offline_or_not_needed(tmp_path):
    def no_network(host, port):
        return False

    def network(host, port):
        return True

    assert run_course.weights_problem("offline", tmp_path, no_network) is None
    assert run_course.weights_problem("gpt2-medium", tmp_path, network) is None
    cached = tmp_path / "355M"
    cached.mkdir()
    for name in weights.GPT2_FILES[:-1]:
        (cached / name).write_text("x")
    assert "355M" in run_course.weights_problem("gpt2-medium", tmp_path, no_network)
    (cached / weights.GPT2_FILES[-1]).write_text("x")
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
    root, out = tmp_path / "course", tmp_path / "out"
    course_with(root, "08_look.ipynb")
    write_notebook(root / "09_score.ipynb", "raise SystemExit('must not run')")
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")

    assert run_course.main(["--artifacts", str(out), "--from", "8"], root=root) == 0

    printed = capsys.readouterr().out
    assert re.search(r"^09_score.ipynb\s+skipped: no judge$", printed, re.M)
    assert "judge score        not scored:\n    No Ollama server answers at" in printed
    assert "ollama serve" in printed and "python run_course.py --only 09" in printed
    assert [r["notebook"] for r in records(out)] == ["08_look.ipynb"]


# -- choosing notebooks and options -------------------------------------------------------


def test_only_from_and_bonus_select_notebooks():
    notebooks = [Path(f"{i:02d}_step.ipynb") for i in range(1, 11)]

    def numbers(**kwargs):
        return [p.name[:2] for p in run_course.select_notebooks(notebooks, **kwargs)]

    assert numbers() == [f"{i:02d}" for i in range(1, 10)]  # the nine: no bonus by default
    assert numbers(bonus=True) == [f"{i:02d}" for i in range(1, 11)]  # 10 after 09
    assert numbers(only="07,8") == ["07", "08"]
    assert numbers(only="10") == ["10"]
    assert numbers(start="05") == ["05", "06", "07", "08", "09"]
    assert numbers(start="05", bonus=True) == ["05", "06", "07", "08", "09", "10"]
    assert numbers(start="10") == ["10"]
    assert numbers(only="03_step") == ["03"]
    with pytest.raises(ValueError, match="--only 12: no such notebook"):
        numbers(only="12")
    with pytest.raises(ValueError, match="--from 11: no such notebook"):
        numbers(start="11")


def test_options_become_course_variables(tmp_path):
    args = run_course.parse_args(
        ["--model", "gpt2-large", "--judge-model", "phi3", "--batch-size", "4", "--lr", "1e-4"]
        + ["--device", "cpu", "--precision", "fp32", "--prompt-style", "phi3"]
        + ["--dataset", "alpaca", "--data-limit", "2000", "--finetune", "lora"]
        + ["--stage", "dpo", "--judge-runs", "1", "--bonus"]
        + ["--artifacts", str(tmp_path / "a")]
    )
    env = run_course.course_settings(args, base={"COURSE_EPOCHS": "1", "OTHER": "kept"})
    assert env["COURSE_MODEL"] == "gpt2-large" and env["COURSE_JUDGE_MODEL"] == "phi3"
    assert env["COURSE_BATCH_SIZE"] == "4" and env["COURSE_LR"] == "1e-4"
    assert env["COURSE_DEVICE"] == "cpu" and env["COURSE_PRECISION"] == "fp32"
    assert env["COURSE_PROMPT_STYLE"] == "phi3" and env["COURSE_EPOCHS"] == "1"
    assert env["COURSE_DATASET"] == "alpaca" and env["COURSE_DATA_LIMIT"] == "2000"
    assert env["COURSE_FINETUNE"] == "lora" and env["COURSE_STAGE"] == "dpo"
    assert env["COURSE_JUDGE_RUNS"] == "1" and args.bonus
    assert env["COURSE_ARTIFACTS"] == str(tmp_path / "a") and env["OTHER"] == "kept"
    assert "COURSE_MASK_INSTRUCTIONS" not in env
    with pytest.raises(SystemExit):
        run_course.parse_args(["--offline", "--model", "gpt2-small"])


# -- tools/store_outputs.py ------------------------------------------------------------


def test_store_outputs_keeps_figures_and_drops_varying_text(tmp_path):
    from tools import store_outputs

    path = tmp_path / "01_plot.ipynb"
    write_notebook(
        path,
        "import time\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nprint(time.time())"
        "\nplt.show()",
        "import os\nprint(os.environ['COURSE_JUDGE_RUNS'], os.environ.get('MPLBACKEND'))",
    )
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].metadata["tags"] = ["nbval-ignore-output"]
    nbformat.write(nb, path)
    env = dict(os.environ, MPLBACKEND="Agg")  # Agg would draw no figure in the kernel
    env.pop("COURSE_JUDGE_RUNS", None)
    with run_course.environment(env):  # main sets the notebooks' environment: undone after
        assert store_outputs.main([str(path)]) == 0

    plot, settings_cell = nbformat.read(path, as_version=4).cells[1:]
    assert [o.output_type for o in plot.outputs] == ["display_data"]
    assert list(plot.outputs[0].data) == ["image/png"]  # the figure, not the time
    assert settings_cell.outputs[0].text == "1 module://matplotlib_inline.backend_inline\n"
