"""Notebook 05's claims: the course's loop takes the book's steps, and the training log.

- `course.training.train_model_simple` (listing 7.8's signature, the course's resumable
  loop underneath) with the book's optimizer gives the losses, tokens seen and printed
  lines of `helpers.train_model_simple`, without a run set up and with one (which writes
  the run's `-sft.pth` and training log);
- `course.training.train_model` with the course's optimizer (`course.speed.make_optimizer`)
  and fast loss gives the losses of the book's `helpers.train_model_simple` with
  `torch.optim.AdamW`, within fp32 rounding, on the offline model (with and without
  instruction masking);
- the book's training log shipped with the course is the official one and says what
  notebooks 05 and 06 quote from it;
- notebook 05's training log is written and read through course.artifacts.
"""

import hashlib
import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import helpers
from course import artifacts, settings, speed, training
from course.training import train_model

ROOT = Path(__file__).resolve().parent.parent
BOOK_LOG_SHA256 = "62035b718660dc6cb3673584629f2b3b7402bfd12336b33b6b4ac47149d10955"
EPOCHS, EVAL_FREQ, EVAL_ITER = 2, 2, 1


@pytest.fixture(scope="module")
def entries():
    return json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))[:40]


def setup(entries, tokenizer, mask):
    """Notebook 05's set-up, small: the offline model's shape, 24 + 16 entries, batch 8."""
    collate = partial(
        helpers.custom_collate_fn, device="cpu", allowed_max_length=1024, mask_instructions=mask
    )

    def loader(data, shuffle):
        dataset = helpers.InstructionDataset(data, tokenizer, with_instruction_length=mask)
        return DataLoader(
            dataset, batch_size=8, collate_fn=collate, shuffle=shuffle, drop_last=shuffle
        )

    torch.manual_seed(123)
    model = helpers.GPTModel({**settings.model_config("offline"), "context_length": 256})
    torch.manual_seed(123)
    return model, loader(entries[:24], True), loader(entries[24:], False)


@pytest.mark.parametrize("mask", [False, True])
def test_train_model_gives_the_losses_of_train_model_simple(entries, tokenizer, mask, capsys):
    model, train_loader, val_loader = setup(entries, tokenizer, mask)
    book_optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    book = helpers.train_model_simple(
        model,
        train_loader,
        val_loader,
        book_optimizer,
        "cpu",
        EPOCHS,
        EVAL_FREQ,
        EVAL_ITER,
        helpers.format_input(entries[-1]),
        tokenizer,
    )
    book_printed = capsys.readouterr().out

    model, train_loader, val_loader = setup(entries, tokenizer, mask)
    course = train_model(
        model,
        train_loader,
        val_loader,
        speed.make_optimizer(model, lr=5e-4, weight_decay=0.1),
        "cpu",
        num_epochs=EPOCHS,
        eval_freq=EVAL_FREQ,
        eval_iter=EVAL_ITER,
        start_context=helpers.format_input(entries[-1]),
        tokenizer=tokenizer,
        show_progress=False,
    )
    course_printed = capsys.readouterr().out

    train_losses, val_losses, tokens_seen = book
    assert len(train_losses) == len(course["train_losses"]) == 3
    assert course["train_losses"] == pytest.approx(train_losses, abs=1e-5, rel=0)
    assert course["val_losses"] == pytest.approx(val_losses, abs=1e-5, rel=0)
    assert course["tokens_seen"] == tokens_seen
    assert course["eval_steps"] == [0, 2, 4]
    assert train_losses[-1] < train_losses[0] - 0.1  # it trained

    # the same printed evaluation lines (their losses may differ in the last printed digit)
    def lines(text):
        return [
            re.sub(r"\d+\.\d{3}", "#", line) for line in text.splitlines() if line.startswith("Ep ")
        ]

    assert lines(course_printed) == lines(book_printed) != []


def evaluation_lines(text):
    """The printed evaluation lines, losses masked (they may differ in the last digit)."""
    return [
        re.sub(r"\d+\.\d{3}", "#", line) for line in text.splitlines() if line.startswith("Ep ")
    ]


def book_and_course_simple(entries, tokenizer, mask, capsys, before_course=lambda: None):
    """helpers.train_model_simple, then course.training.train_model_simple, each on a
    fresh copy of the set-up with torch.optim.AdamW as the book builds it."""
    results = []
    for train in (helpers.train_model_simple, None):
        model, train_loader, val_loader = setup(entries, tokenizer, mask)
        if train is None:
            before_course()
            train = training.train_model_simple
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
        lists = train(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            num_epochs=EPOCHS,
            eval_freq=EVAL_FREQ,
            eval_iter=EVAL_ITER,
            start_context=helpers.format_input(entries[-1]),
            tokenizer=tokenizer,
        )
        results.append((lists, capsys.readouterr().out, model))
    return results


@pytest.mark.parametrize("mask", [False, True])
def test_course_train_model_simple_gives_the_losses_of_the_books(entries, tokenizer, mask, capsys):
    training.forget_run()
    (book, book_out, _), (course, course_out, _) = book_and_course_simple(
        entries, tokenizer, mask, capsys
    )
    assert len(course) == 3 and len(course[0]) == len(book[0]) == 3
    assert course[0] == pytest.approx(book[0], abs=1e-5, rel=0)
    assert course[1] == pytest.approx(book[1], abs=1e-5, rel=0)
    assert course[2] == book[2]
    assert book[0][-1] < book[0][0] - 0.1  # it trained
    assert evaluation_lines(course_out) == evaluation_lines(book_out) != []
    samples = [line for line in book_out.splitlines() if line.startswith("Below is")]
    assert len(samples) == EPOCHS and all(sample in course_out for sample in samples)
    assert re.search(r"Training completed in \d+\.\d\d minutes\.", course_out)


def test_course_train_model_simple_trains_the_run_set_up_and_saves_it(
    entries, tokenizer, capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    config = {"model": "offline", "finetune": "full", "batch_size": 8, "seed": 123}
    run = training.use_run(
        "offlinetiny", config, initial_losses={"train": 10.9, "val": 10.9}, show_progress=False
    )
    try:
        (book, book_out, _), (course, course_out, model) = book_and_course_simple(
            entries, tokenizer, False, capsys
        )
    finally:
        training.forget_run()
    assert course[0] == pytest.approx(book[0], abs=1e-5, rel=0)
    assert course[1] == pytest.approx(book[1], abs=1e-5, rel=0)
    assert evaluation_lines(course_out) == evaluation_lines(book_out) != []
    assert run.history["finished"] and run.history["train_losses"] == course[0]
    assert "Training completed in" in course_out and "(cpu, fp32)" in course_out
    assert "Saved offlinetiny-sft.pth" in course_out
    log = artifacts.read_training_log("offlinetiny")
    assert log["val_losses"] == course[1] and log["config"]["num_epochs"] == EPOCHS
    assert log["initial_losses"] == {"train": 10.9, "val": 10.9}
    saved = torch.load(tmp_path / "offlinetiny-sft.pth", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    assert not (tmp_path / "offlinetiny.lock").exists()  # released


def test_the_books_training_log_is_the_official_one():
    path = ROOT / "book-training-log.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BOOK_LOG_SHA256
    log = json.loads(path.read_text(encoding="utf-8"))
    # what notebooks 05 and 06 quote from it
    assert round(log["initial_losses"]["train"], 3) == 3.826
    assert round(log["initial_losses"]["val"], 3) == 3.762
    evaluations = log["evaluations"]
    assert len(evaluations) == 47
    assert [e["step"] for e in evaluations] == list(range(0, 231, 5))
    assert (evaluations[0]["train_loss"], evaluations[0]["val_loss"]) == (2.637, 2.626)
    assert (evaluations[-1]["train_loss"], evaluations[-1]["val_loss"]) == (0.299, 0.657)
    best = min(evaluations, key=lambda e: e["val_loss"])
    assert (best["step"], best["val_loss"]) == (205, 0.628)
    end_of_epoch_1 = evaluations[23]
    assert (end_of_epoch_1["step"], end_of_epoch_1["val_loss"]) == (115, 0.665)
    assert log["samples_after_epoch"][0] == "The meal is prepared every day by the chef."


def a_log(**changes):
    log = {
        "model": "offline (tiny)",
        "config": {"prompt_style": "alpaca", "mask_instructions": False, "finetune": "full"},
        "initial_losses": {"train": 10.9, "val": 10.9},
        "duration_minutes": 0.1,
        "train_losses": [10.0, 9.0],
        "val_losses": [10.1, 9.5],
        "tokens_seen": [100, 600],
        "epochs_seen": [0.0, 1.0],
        "eval_steps": [0, 5],
    }
    return {**log, **changes}


def test_training_log_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    path = artifacts.write_training_log("offlinetiny", a_log())
    assert path == tmp_path / "offlinetiny-training-log.json"
    log = artifacts.read_training_log("offlinetiny")
    assert log["format"] == artifacts.TRAINING_LOG_FORMAT
    assert log["val_losses"] == [10.1, 9.5]
    with pytest.raises(ValueError, match="lists differ in length"):
        artifacts.write_training_log("offlinetiny", a_log(val_losses=[1.0]))
    with pytest.raises(ValueError, match="lacks config"):
        artifacts.write_training_log(
            "offlinetiny", {k: v for k, v in a_log().items() if k != "config"}
        )


def test_a_damaged_or_incomplete_training_log_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    with pytest.raises(artifacts.MissingArtifact, match="05_instruction_finetuning"):
        artifacts.read_training_log("offlinetiny")
    path = tmp_path / "offlinetiny-training-log.json"
    path.write_text(json.dumps(a_log())[:50])
    with pytest.raises(artifacts.ArtifactError, match="offlinetiny-training-log.json is cut off"):
        artifacts.read_training_log("offlinetiny")
    path.write_text(json.dumps({"train_losses": [1.0]}))
    with pytest.raises(artifacts.ArtifactError, match="not a complete training log.*lacks model"):
        artifacts.read_training_log("offlinetiny")
