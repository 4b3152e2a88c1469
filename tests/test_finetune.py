"""course.finetune: notebook 05's training from the command line, in one process and under torchrun.

Real runs on the offline model and the CPU (gloo), on 60 entries of the book's data
(6 steps of a global batch of 8, evaluations at steps 0 and 5), each in a private
artifacts folder:

- two processes with batch 4 give the losses, tokens seen and weights of one process
  with batch 8, within float rounding, and only rank 0 writes files (an audit hook
  in every process records each file it opens for writing, creates or renames);
- a two-process run whose rank 1 is killed with SIGKILL after a checkpoint stops
  with a message and keeps its checkpoint; a run with another global batch refuses
  to continue it, and one process with the same global batch continues it to the
  result of the uninterrupted run;
- Ctrl+C during training, and a checkpoint a run refuses to continue, say what to do
  in the command line's words (the same command, --retrain, --batch-size): the
  training loop prints them, in the words course.finetune asks it for;
- a second run into a folder where one trains stops and names the first.

`python -m torch.distributed.run` is torchrun, for machines where the script is not
on the PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import DataLoader

import helpers
import run_course
from course import finetune

ROOT = Path(__file__).resolve().parent.parent
STEM = "offlinetiny-book-n60"
SETTINGS = ["--offline", "--epochs", "1", "--data-limit", "60"]

AUDIT_HOOK = textwrap.dedent(
    """
    import os, sys
    _folder = os.environ.get("FINETUNE_TEST_WATCH")
    if _folder:
        _log = open(os.path.join(os.environ["FINETUNE_TEST_LOG"], f"{os.getpid()}.txt"), "a")
        _rank = os.environ.get("RANK", "launcher")

        def _hook(event, args):
            paths = []
            if event == "open" and isinstance(args[1], str) and set(args[1]) & set("wxa+"):
                paths = [args[0]]
            elif event in ("os.rename", "os.remove"):
                paths = list(args[:2]) if event == "os.rename" else [args[0]]
            elif event == "os.mkdir" and not os.path.isdir(args[0]):  # (exist_ok: no change)
                paths = [args[0]]
            for path in paths:
                if isinstance(path, (str, os.PathLike)) and str(path).startswith(_folder):
                    _log.write(f"{_rank}\\t{event}\\t{os.fspath(path)}\\n")
                    _log.flush()

        sys.addaudithook(_hook)
    """
)


def command(processes: int, batch_size: int, *extra: str) -> list[str]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    return [*launcher, "-m", "course.finetune", *SETTINGS, "--batch-size", str(batch_size), *extra]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A models folder shared by the runs, the split made once, and the audit hook."""
    base = tmp_path_factory.mktemp("finetune")
    (base / "hook").mkdir()
    (base / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK, encoding="utf-8")
    return base


def run(place: Path, name: str, cmd: list[str], wait=True, watch=False):
    """Run `cmd` from the course's folder with artifacts in place/name."""
    folder = place / name
    folder.mkdir(exist_ok=True)
    split = place / "split-book-n60.json"
    if split.exists() and not (folder / split.name).exists():
        shutil.copy(split, folder)
    env = {
        **os.environ,
        "COURSE_ARTIFACTS": str(folder),
        "COURSE_MODELS_DIR": str(place / "gpt2"),
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    if watch:
        (place / f"{name}-audit").mkdir(exist_ok=True)
        env["PYTHONPATH"] = os.pathsep.join([str(place / "hook"), str(ROOT)])
        env["FINETUNE_TEST_WATCH"] = str(folder)
        env["FINETUNE_TEST_LOG"] = str(place / f"{name}-audit")
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if not wait:
        return process
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    if not split.exists():
        shutil.copy(folder / split.name, split)
    return out


def read_run(folder: Path) -> tuple[dict, dict]:
    log = json.loads((folder / f"{STEM}-training-log.json").read_text(encoding="utf-8"))
    state = torch.load(folder / f"{STEM}-sft.pth", weights_only=True)
    return log, state


@pytest.fixture(scope="module")
def one_process(place):
    out = run(place, "one", command(1, 8))
    return (*read_run(place / "one"), out)


@pytest.fixture(scope="module")
def two_processes(place, one_process):
    out = run(place, "two", command(2, 4), watch=True)
    return (*read_run(place / "two"), out)


# -- the sampler, without processes --------------------------------------------------------


def test_one_process_takes_notebook_05s_batches_and_random_draws():
    size, batch = 45, 8
    torch.manual_seed(123)
    loader = DataLoader(list(range(size)), batch_size=batch, shuffle=True, drop_last=True)
    expected = [[b.tolist() for b in loader] for _ in range(3)]
    after = torch.get_rng_state()

    torch.manual_seed(123)
    sharded = DataLoader(
        list(range(size)),
        batch_sampler=finetune.ShardedBatches(size, batch, shuffle=True),
        collate_fn=partial(finetune.collate_part, collate=lambda items: items),
    )
    assert [list(sharded) for _ in range(3)] == expected
    assert torch.equal(torch.get_rng_state(), after)  # the next epoch's shuffle too


def test_the_parts_of_n_processes_make_up_the_global_batches():
    size = 45

    def epoch(rank, world, batch, shuffle):
        torch.manual_seed(7)
        return list(finetune.ShardedBatches(size, batch, rank, world, shuffle))

    for shuffle in (True, False):
        whole = epoch(0, 1, 12, shuffle)
        for world in (2, 3, 4):
            parts = [epoch(rank, world, 12 // world, shuffle) for rank in range(world)]
            assert all(len(p) == len(whole) for p in parts)
            joined = [sum((p[step] for p in parts), []) for step in range(len(whole))]
            assert joined == whole
    # without shuffling the last batch is incomplete (9 of 12): the last process gets
    # an empty part, which collate_part turns into None
    last = epoch(3, 4, 3, False)[-1]
    assert last == [] and finetune.collate_part(last, collate=len) is None
    assert epoch(2, 4, 3, False)[-1] == [42, 43, 44]


def test_the_flags_are_run_courses():
    course_flags = {flag: name for flag, name, _ in run_course.OPTIONS}
    for flag, name, _ in finetune.OPTIONS:
        assert course_flags.get(flag) == name, flag


def test_the_shared_flags_set_the_same_variables_as_run_courses(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.json").write_text("[]")
    argv = ["--offline", "--epochs", "1", "--mask-instructions", "--dataset", "mine.json"]
    argv += ["--models-dir", "~/weights", "--artifacts", "out", "--batch-size", "4"]
    expected = run_course.course_settings(run_course.parse_args(argv), base={})
    monkeypatch.setattr(os, "environ", {})
    finetune.apply_flags(finetune.parse_args(argv))
    assert os.environ == expected
    assert os.environ["COURSE_DATASET"] == str(tmp_path / "mine.json")
    assert os.environ["COURSE_MODELS_DIR"] == str(Path("~/weights").expanduser())
    assert os.environ["COURSE_ARTIFACTS"] == str(tmp_path / "out")


# -- real runs ----------------------------------------------------------------------------


def test_one_process_runs_notebook_05_and_prints_its_progress(one_process, place):
    log, state, out = one_process
    assert "No split split-book-n60.json" in out  # made as notebook 01 makes it
    assert "Entries: train 51, validation 3, test 6" in out
    assert "Ep 1 (Step 000000): Train loss" in out and "Ep 1 (Step 000005)" in out
    assert f"Saved {STEM}-sft.pth" in out
    assert log["eval_steps"] == [0, 5]
    assert log["config"]["batch_size"] == 8 and log["config"]["processes"] == 1
    assert set(state) == set(
        helpers.GPTModel(finetune.settings.model_config("offline")).state_dict()
    )


def test_two_processes_of_batch_4_train_as_one_of_batch_8(one_process, two_processes):
    log1, state1, _ = one_process
    log2, state2, out = two_processes
    assert "2 processes (gloo): batch 4 per process, global batch 8" in out
    assert log2["config"]["batch_size"] == 8
    assert (log2["config"]["processes"], log2["config"]["per_process_batch_size"]) == (2, 4)
    assert log2["eval_steps"] == log1["eval_steps"]
    assert log2["tokens_seen"] == log1["tokens_seen"]  # the same examples, padded alike
    for key in ("train_losses", "val_losses"):
        assert log2[key] == pytest.approx(log1[key], rel=1e-5), key
    for key in ("train", "val"):
        assert log2["initial_losses"][key] == pytest.approx(log1["initial_losses"][key], rel=1e-5)
    assert log2["samples"] == log1["samples"]
    assert set(state2) == set(state1)
    for name in state1:
        torch.testing.assert_close(state2[name], state1[name], rtol=1e-4, atol=1e-6, msg=name)
    assert log1["train_losses"][-1] < log1["train_losses"][0]  # it did train


def audit(place: Path, name: str) -> list[tuple[str, str, str]]:
    lines = []
    for path in (place / f"{name}-audit").glob("*.txt"):
        lines += [tuple(line.split("\t")) for line in path.read_text().splitlines()]
    return lines


def test_only_rank_0_writes_files(place, two_processes):
    writes = audit(place, "two")
    ranks = {rank for rank, _, _ in writes}
    assert ranks == {"0"}, sorted(set(writes))
    written = {Path(path).name for _, event, path in writes if event == "os.rename"}
    assert {
        f"{STEM}-sft.pth",
        f"{STEM}-training-log.json",
        f"{STEM}-train-checkpoint.pth",
    } <= written


def test_a_killed_process_stops_the_run_and_it_continues_on_another_number_of_processes(
    place, one_process, two_processes
):
    log1, state1, _ = one_process
    folder = place / "killed"
    process = run(place, "killed", command(2, 4, "--checkpoint-every", "2"), wait=False)
    checkpoint = folder / f"{STEM}-train-checkpoint.pth"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.02)
    workers = {
        child.environ().get("RANK"): child
        for child in psutil.Process(process.pid).children(recursive=True)
    }
    os.kill(workers["1"].pid, signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "Process 0 of 2: stopped" in err, err[-3000:]
    assert f"The last checkpoint, {checkpoint.name}" in err and "intact" in err
    assert "Signal 9 (SIGKILL)" in err  # torchrun names the failed process
    saved = torch.load(checkpoint, weights_only=False)
    assert not saved["progress"]["finished"] and saved["progress"]["global_step"] < 5

    # another global batch would mix two runs: refused, naming both batch sizes
    refused = run(place, "killed", command(1, 4), wait=False)
    out, err = refused.communicate(timeout=300)
    assert refused.returncode == 1, out[-2000:] + err[-2000:]
    assert "batch_size 8 then, 4 now" in err, err[-2000:]
    assert torch.load(checkpoint, weights_only=False)["progress"] == saved["progress"]

    # one process with batch 8 continues the run of two with batch 4
    out = run(place, "killed", command(1, 8))
    assert f"Continuing from {checkpoint.name}" in out
    log, state = read_run(folder)
    assert log["eval_steps"] == log1["eval_steps"] and log["tokens_seen"] == log1["tokens_seen"]
    for key in ("train_losses", "val_losses"):
        assert log[key] == pytest.approx(log1[key], rel=1e-5), key
    for name in state1:
        torch.testing.assert_close(state[name], state1[name], rtol=1e-4, atol=1e-6, msg=name)


# -- the command line's words (the training loop's messages, course.training) --------------

NOTEBOOK_WORDS = ("the cell", "training cell", "force=True")


def test_ctrl_c_in_training_names_the_same_command(place):
    folder = place / "ctrl-c"
    process = run(place, "ctrl-c", command(1, 8, "--checkpoint-every", "1"), wait=False)
    checkpoint = folder / f"{STEM}-train-checkpoint.pth"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl+C in a terminal: the whole group
    out, err = process.communicate(timeout=120)
    said = out + err
    assert process.returncode == 130, said[-3000:]
    assert "Interrupted" in said and checkpoint.name in said, said[-3000:]
    assert "same command" in said, said[-3000:]
    assert not [words for words in NOTEBOOK_WORDS if words in said], said[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_refused_checkpoint_names_the_flags(place):
    run(place, "refused", command(1, 8, "--max-steps", "1"))  # a global batch of 8
    refused = run(place, "refused", command(1, 4), wait=False)
    out, err = refused.communicate(timeout=300)
    said = out + err
    assert refused.returncode == 1, said[-3000:]
    assert "batch_size 8 then, 4 now" in err, said[-3000:]
    assert "--retrain" in err and "--batch-size" in err, said[-3000:]
    assert not [words for words in NOTEBOOK_WORDS if words in said], said[-3000:]


def test_a_second_run_into_the_same_folder_stops_naming_the_first(place):
    folder = place / "twice"
    first = run(
        place, "twice", command(1, 8, "--epochs", "400", "--checkpoint-every", "1"), wait=False
    )
    try:
        checkpoint = folder / f"{STEM}-train-checkpoint.pth"
        deadline = time.monotonic() + 240
        while not checkpoint.exists():  # the first one trains
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.05)
        second = run(place, "twice", command(1, 8), wait=False)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 1, out[-2000:] + err[-2000:]
        assert f"process {first.pid} on " in err, err[-2000:]
        assert "run the same command again" in err, err[-2000:]
        assert first.poll() is None  # the first one goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
