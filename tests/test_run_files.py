"""A run's files: a run with other settings keeps the earlier run in `replaced/`, and a
second run into the same folder stops while the first holds its lock.

Each test trains the tiny offline-shaped model for real through
`course.training.train_model_simple`, as notebook 05 does after `use_run`; the lock is
tested with real processes (this file run as a script trains one run).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import helpers
from course import artifacts, lora, settings, training
from course.run_files import REPLACED, RunInProgress

ROOT = Path(__file__).resolve().parent.parent
STEM = "offlinetiny"
BOOK = {"epochs": 1, "lr": 5e-4, "batch_size": 8, "seed": 123, "weight_decay": 0.1}


RUNS: list = []  # the runs `train` set up, the last one last


def train(
    tokenizer,
    *,
    finetune="full",
    lora_rank=4,
    retrain=False,
    interface="notebook",
    log_extra=None,
    **changes,
):
    """Notebook 05 in small: set up the run, then the book's train_model_simple call."""
    max_steps = changes.pop("max_steps", None)
    s = {**BOOK, **changes}
    entries = json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))[:40]
    collate = partial(helpers.custom_collate_fn, device="cpu", allowed_max_length=1024)
    torch.manual_seed(s["seed"])
    model = helpers.GPTModel({**settings.model_config("offline"), "context_length": 256})
    if finetune == "lora":
        lora.apply_lora(model, lora_rank, 8)
    train_loader = DataLoader(
        helpers.InstructionDataset(entries[:24], tokenizer),
        batch_size=s["batch_size"],
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
    )
    val_loader = DataLoader(
        helpers.InstructionDataset(entries[24:], tokenizer), batch_size=8, collate_fn=collate
    )
    config = {
        "model": "offline",
        "finetune": finetune,
        "lora_rank": lora_rank if finetune == "lora" else None,
        "batch_size": s["batch_size"],
        "seed": s["seed"],
    }
    stem = STEM + ("-lora" if finetune == "lora" else "")
    run = training.use_run(
        stem,
        config,
        retrain=retrain,
        max_steps=max_steps,
        show_progress=False,
        interface=interface,
        log_extra=log_extra or {},
    )
    RUNS.append(run)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    try:
        return training.train_model_simple(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            num_epochs=s["epochs"],
            eval_freq=1,
            eval_iter=1,
            start_context=helpers.format_input(entries[-1]),
            tokenizer=tokenizer,
        )
    finally:
        training.forget_run()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    return tmp_path


def backups(folder):
    return sorted((folder / REPLACED).glob("*")) if (folder / REPLACED).exists() else []


def test_a_second_run_with_other_epochs_keeps_the_first_runs_weights_where_the_readme_says(
    tokenizer, folder, capsys
):
    first = train(tokenizer, epochs=1)
    sft = folder / f"{STEM}-sft.pth"
    first_bytes = sft.read_bytes()
    first_log = artifacts.read_training_log(STEM)
    capsys.readouterr()

    second = train(tokenizer, epochs=2)
    out = capsys.readouterr().out
    (backup,) = backups(folder)
    assert re.fullmatch(rf"{STEM}-\d{{8}}T\d{{6}}Z", backup.name)
    assert (backup / sft.name).read_bytes() == first_bytes
    kept_log = json.loads((backup / f"{STEM}-training-log.json").read_text())
    assert kept_log["val_losses"] == first_log["val_losses"] == first[1]
    assert (backup / f"{STEM}-train-checkpoint.pth").exists()
    assert "num_epochs 1 then, 2 now" in out and str(backup) in out
    # the new run's files are in place, and they are the second run's
    assert artifacts.read_training_log(STEM)["val_losses"] == second[1]
    assert sft.read_bytes() != first_bytes
    # the README's settings paragraph states where the earlier run goes
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = next(p for p in readme.split("\n\n") if "Artifacts are named after" in p)
    assert "replaced/<run>-<UTC time>/" in paragraph


@pytest.mark.parametrize(
    "change",
    [{"lr": 1e-3}, {"batch_size": 4}, {"seed": 7}, {"weight_decay": 0.0}],
    ids=["lr", "batch_size", "seed", "weight_decay"],
)
def test_any_other_setting_keeps_the_earlier_run(tokenizer, folder, capsys, change):
    train(tokenizer)
    first_bytes = (folder / f"{STEM}-sft.pth").read_bytes()
    train(tokenizer, **change)
    (backup,) = backups(folder)
    assert (backup / f"{STEM}-sft.pth").read_bytes() == first_bytes
    key = {"lr": "lr"}.get(next(iter(change)), next(iter(change)))
    assert f"{key} " in capsys.readouterr().out


def test_another_lora_rank_keeps_the_earlier_lora_run(tokenizer, folder, capsys):
    train(tokenizer, finetune="lora", lora_rank=4)
    first_bytes = (folder / f"{STEM}-lora-sft.pth").read_bytes()
    train(tokenizer, finetune="lora", lora_rank=2)
    assert "lora_rank 4 then, 2 now" in capsys.readouterr().out
    (backup,) = backups(folder)
    assert (backup / f"{STEM}-lora-sft.pth").read_bytes() == first_bytes


def test_the_same_settings_reload_the_finished_run_and_keep_no_backup(tokenizer, folder, capsys):
    first = train(tokenizer)
    stamp = (folder / f"{STEM}-sft.pth").stat().st_mtime_ns
    again = train(tokenizer)
    assert again == first and "already finished" in capsys.readouterr().out
    assert backups(folder) == []
    assert (folder / f"{STEM}-sft.pth").stat().st_mtime_ns == stamp  # not written again


def test_a_run_without_a_record_of_its_settings_is_kept_too(tokenizer, folder, capsys):
    """The book's own -sft.pth copied into the folder: no log, no checkpoint."""
    (folder / f"{STEM}-sft.pth").write_bytes(b"the book's weights")
    train(tokenizer)
    assert "settings cannot be read" in capsys.readouterr().out
    (backup,) = backups(folder)
    assert (backup / f"{STEM}-sft.pth").read_bytes() == b"the book's weights"


def test_an_unfinished_run_with_other_settings_is_refused_then_kept_on_retrain(
    tokenizer, folder, capsys
):
    train(tokenizer, max_steps=1)
    checkpoint = folder / f"{STEM}-train-checkpoint.pth"
    saved = checkpoint.read_bytes()
    with pytest.raises(ValueError, match="unfinished training run with other settings"):
        train(tokenizer, lr=1e-3)
    assert checkpoint.read_bytes() == saved and backups(folder) == []
    train(tokenizer, lr=1e-3, retrain=True)
    (backup,) = backups(folder)
    assert (backup / checkpoint.name).read_bytes() == saved
    assert "lr 0.0005 then, 0.001 now" in capsys.readouterr().out


# -- two processes --------------------------------------------------------------------------


def start_process(folder, epochs, interface="command line"):
    """This file as a script: one training run into `folder`, in a process of its own."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COURSE_ARTIFACTS": str(folder),
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), str(epochs), interface],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_training(process):
    """Read the process's output until its first evaluation line: it trains now."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Ep 1 (Step 000000)"):
            return lines
    raise AssertionError(f"the process ended before training: {''.join(lines)}")


def test_two_processes_into_one_folder_the_second_stops_naming_the_first(tmp_path):
    first = start_process(tmp_path, epochs=400)
    try:
        wait_for_training(first)
        second = start_process(tmp_path, epochs=1)
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 3, out
        assert f"Another run of {STEM} is training into {tmp_path}" in out
        assert f"process {first.pid} on " in out and "test_run_files.py 400 command line" in out
        assert "run the same command again" in out and "--artifacts" in out
        assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        first.wait()


def test_a_killed_run_does_not_leave_the_run_locked(tmp_path, tokenizer, monkeypatch, capsys):
    first = start_process(tmp_path, epochs=400, interface="notebook")
    try:
        wait_for_training(first)
        monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
        with pytest.raises(RunInProgress, match=rf"process {first.pid} on .*run the cell again"):
            train(tokenizer)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (tmp_path / f"{STEM}.lock").exists()  # left behind, but no longer locked
    time.sleep(0.1)
    lists = train(tokenizer, retrain=True)
    assert len(lists[0]) == 3 and "Training completed" in capsys.readouterr().out
    assert not (tmp_path / f"{STEM}.lock").exists()


if __name__ == "__main__":  # one run, for the tests above: epochs, interface
    try:
        train(helpers.get_tokenizer(), epochs=int(sys.argv[1]), interface=sys.argv[2])
    except RunInProgress as exc:
        print(f"Error: {exc}", flush=True)
        sys.exit(3)


def test_whose_lora_code_trained_is_logged_and_makes_no_other_run(tokenizer, folder, capsys):
    """Notebook 05 records in the log whose LoRA code trained ("yours" or "course"): not a
    setting, so the next pass with the other code loads the run (nothing set aside) and
    says what the log recorded; retraining records the new code."""
    train(tokenizer, finetune="lora", log_extra={"lora_code": "course"})
    stem = f"{STEM}-lora"
    log_bytes = (folder / f"{stem}-training-log.json").read_bytes()
    capsys.readouterr()

    train(tokenizer, finetune="lora", log_extra={"lora_code": "yours"})
    assert "Saved" not in capsys.readouterr().out  # loaded, not trained
    assert RUNS[-1].training_log["config"]["lora_code"] == "course"  # what trained it
    assert (folder / f"{stem}-training-log.json").read_bytes() == log_bytes
    assert backups(folder) == []

    train(tokenizer, finetune="lora", retrain=True, log_extra={"lora_code": "yours"})
    assert artifacts.read_training_log(stem)["config"]["lora_code"] == "yours"
    assert backups(folder) == []  # the same settings: overwritten, not set aside
