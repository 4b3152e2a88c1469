"""Exercise 7.4 in notebook 05: once the check says right, the LoRA run trains the
student's LinearWithLoRA, and a correct one ends with the course's solution's weights.

The student's code is the notebook's own: the folded solution (the printed book's
appendix E code) and the scaffold, run as notebook cells.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from test_exercise_lora import define, notebook_cells, scaled_by_alpha_over_rank, wrong_forward
from torch.utils.data import DataLoader

import helpers
from course import lora, settings, training
from course.exercises.lora import check_lora
from course.exercises.lora_run import chapter_lora_code, train_again_with_yours
from course.training import train_model_simple

ROOT = Path(__file__).resolve().parent.parent
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def student():
    """The names the notebook's folded solution defines, as a student's kernel holds them."""
    return define(notebook_cells()[1])


def test_a_right_answer_is_what_trains(student):
    replace, code, message = chapter_lora_code(student, "no-such-run")
    assert replace is student["replace_linear_with_lora"] and code == "yours"
    assert "trains with your LinearWithLoRA" in message


def test_until_then_the_course_solution_trains_and_says_why(student):
    no_grad = wrong_forward(lambda self, x: self.linear(x).detach() + self.lora(x))
    cls, replace = no_grad((student["LinearWithLoRA"], student["replace_linear_with_lora"]))
    kernels = {
        "has not run in this kernel": {},
        "says not attempted": define(notebook_cells()[0]),
        "says wrong": {"LinearWithLoRA": cls, "replace_linear_with_lora": replace},
    }
    for why, namespace in kernels.items():
        chosen, code, message = chapter_lora_code(namespace, "no-such-run")
        assert chosen is helpers.replace_linear_with_lora and code == "course", why
        assert "the course's solution" in message and why in message, message


def trained(replace_linear_with_lora, tokenizer):
    """What notebook 05 does with COURSE_FINETUNE=lora, on a small model and 24 entries:
    the adapters go in after torch.manual_seed, then the book's training call (with no
    run set up: it trains without files)."""
    training.forget_run()
    data = json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))[:24]
    collate = partial(helpers.custom_collate_fn, device="cpu", allowed_max_length=256)
    torch.manual_seed(123)
    model = helpers.GPTModel({**settings.model_config("offline"), "context_length": 256})
    torch.manual_seed(123)
    lora.apply_lora(model, RANK, ALPHA, replace_linear_with_lora)
    train_loader = DataLoader(
        helpers.InstructionDataset(data[:16], tokenizer),
        batch_size=4,
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
    )
    val_loader = DataLoader(
        helpers.InstructionDataset(data[16:], tokenizer), batch_size=4, collate_fn=collate
    )
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses = train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        "cpu",
        num_epochs=1,
        eval_freq=2,
        eval_iter=1,
        start_context=helpers.format_input(data[-1]),
        tokenizer=tokenizer,
    )
    return model, losses


@pytest.fixture(scope="module")
def course_run(tokenizer):
    return trained(helpers.replace_linear_with_lora, tokenizer)


def test_the_students_layer_trains_to_the_course_solutions_weights(student, course_run, tokenizer):
    model, losses = trained(chapter_lora_code(student, "no-such-run")[0], tokenizer)
    course_model, course_losses = course_run
    # the student's class is what trained
    layers = lora.lora_layers(model)
    assert len(layers) == 13
    assert all(type(m) is student["LinearWithLoRA"] for m in layers.values())
    assert not any(isinstance(m, helpers.LinearWithLoRA) for m in model.modules())
    assert any(torch.count_nonzero(m.lora.B) for m in layers.values())  # the adapters moved
    # and it ends where the course's solution ends, for the same seed
    assert losses == course_losses
    state, course_state = model.state_dict(), course_model.state_dict()
    assert list(state) == list(course_state)
    for name in state:
        assert torch.equal(state[name], course_state[name]), name
    merged, course_merged = lora.merged_state_dict(model), lora.merged_state_dict(course_model)
    assert all(torch.equal(merged[name], course_merged[name]) for name in course_merged)


def test_a_layer_with_other_numbers_ends_elsewhere(student, course_run, tokenizer):
    """The comparison above can fail: alpha / rank scaling trains to other weights."""
    cls, replace = wrong_forward(scaled_by_alpha_over_rank)(
        (student["LinearWithLoRA"], student["replace_linear_with_lora"])
    )
    model, losses = trained(replace, tokenizer)
    course_model, course_losses = course_run
    assert losses != course_losses
    assert not torch.equal(model.out_head.lora.B, course_model.out_head.lora.B)


def test_the_exercises_last_cell_trains_again_only_when_it_should(student, tmp_path, monkeypatch):
    """After the check: nothing without COURSE_FINETUNE=lora or while the check is not
    right (the course's solution trained the run), and a retraining when it is right and
    no log says the student's code trained the run (the notebook test covers that)."""
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    right = check_lora(student["LinearWithLoRA"], student["replace_linear_with_lora"])
    scaffold = define(notebook_cells()[0])
    not_yet = check_lora(scaffold["LinearWithLoRA"], scaffold["replace_linear_with_lora"])
    assert right.status == "right"
    again, message = train_again_with_yours("full", right, "offlinetiny")
    assert not again and "COURSE_FINETUNE=lora" in message
    again, message = train_again_with_yours("lora", not_yet, "offlinetiny-lora")
    assert not again and "the course's solution" in message and not_yet.status in message
    again, message = train_again_with_yours("lora", right, "offlinetiny-lora")
    assert again and "trains again now with your LinearWithLoRA" in message
