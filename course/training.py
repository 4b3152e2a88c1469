"""Notebook 05's training: the book's `train_model_simple` call (listing 7.8's signature),
resumable underneath, on the run `use_run` set up; `train_model` takes every option. Used by
notebook 05, `python -m course.finetune` and the tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from course.checkpoints import (
    CHECKPOINT_FORMAT,
    get_rng_states,
    load_training_checkpoint,
    save_training_checkpoint,
    set_rng_states,
)
from course.resumable import (
    Task,
    fine_tuning_task,
    print_sample,
    run_resumable,
    training_history,
)
from course.runs import (
    Run,
    current_run,
    forget_run,
    run_config,
    train_run,
    training_log,
    use_run,
)
from course.settings import OFFLINE_MODEL, resolve_model_name
from course.speed import calc_loss_batch_fast, evaluate_model_fast

__all__ = [  # (the names of course.checkpoints, .resumable and .runs stay importable here)
    "CHECKPOINT_FORMAT",
    "Run",
    "Task",
    "check_initial_loss",
    "current_run",
    "fine_tuning_task",
    "forget_run",
    "get_rng_states",
    "load_training_checkpoint",
    "print_sample",
    "run_config",
    "run_resumable",
    "save_training_checkpoint",
    "set_rng_states",
    "single_process_task",
    "train_model",
    "train_model_simple",
    "train_run",
    "training_history",
    "training_log",
    "use_run",
]

BOOK_INITIAL_VAL_LOSS = {"gpt2-medium (355M)": 3.762}


def check_initial_loss(val_loss: float, model_name: str, tolerance: float = 0.5) -> bool:
    """Sanity-check the validation loss of pretrained GPT-2 before fine-tuning.

    Prints what it finds and returns False when the loss is far from what the book
    measured (about 3.8 for GPT-2 medium): a sign that the device computes wrong
    numbers (MPS on PyTorch < 2.9 gave 19.9) or that the weights were not loaded.
    """
    name = resolve_model_name(model_name)
    if name == OFFLINE_MODEL:
        print(
            f"Validation loss {val_loss:.3f}. The offline model has random weights, so "
            "its loss (near ln(50257) = 10.8) says nothing about the device: the check "
            "means something only with pretrained GPT-2."
        )
        return True
    expected = BOOK_INITIAL_VAL_LOSS.get(name)
    if expected is not None:
        reference = f"the book measured {expected:.3f} for {name}"
        far = not abs(val_loss - expected) <= tolerance  # also true for nan
    else:  # the book gives no figure: any pretrained GPT-2 is far below random guessing
        reference = "pretrained GPT-2 stays well below 6 (random guessing gives 10.8)"
        far = not val_loss < 6.0
    if far:
        print(
            f"WARNING: validation loss {val_loss:.3f} before fine-tuning, but {reference}. "
            "Something computes wrong numbers: run again with COURSE_DEVICE=cpu and "
            "compare (MPS on PyTorch older than 2.9 gives such losses), and check that "
            "load_weights_into_gpt ran on this model."
        )
        return False
    print(f"Validation loss {val_loss:.3f} before fine-tuning: as expected ({reference}).")
    return True


def single_process_task(model, train_loader, val_loader, device, eval_iter) -> Task:
    """The fine-tuning Task of one process, on the fast paths of `course.speed`."""
    device = torch.device(device)
    return fine_tuning_task(
        batch_loss=lambda batch: calc_loss_batch_fast(*batch, model, device),
        batch_tokens=lambda batch: batch[0].numel(),
        evaluate_losses=lambda: evaluate_model_fast(
            model, train_loader, val_loader, device, eval_iter
        ),
    )


def train_model_simple(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
):
    """Listing 7.8's training function, resumable: the run `use_run` set up.

    The book's steps, evaluations and printed lines, and its three lists back. The run
    (`current_run()`) gives what the book's call cannot: its files' names, what
    identifies it, the precision, whether to train a finished run again, the words of
    its messages. It continues from its checkpoint, loads a finished run instead of
    repeating it, sets aside a run of the same name with other settings, holds a lock
    against a second run, and writes `-sft.pth` and the training log when it finishes
    (see `course.runs.train_run`); `run.history` keeps the whole history. Without
    `use_run`, it trains in fp32 without files or progress bar.
    """
    task = single_process_task(model, train_loader, val_loader, device, eval_iter)
    book = (num_epochs, eval_freq, eval_iter, start_context, tokenizer)
    run = current_run()
    if run is None:
        history = run_resumable(
            task, model, train_loader, optimizer, device, book, show_progress=False
        )
    else:
        history = train_run(run, task, model, train_loader, optimizer, device, book)
    if history["finished"]:
        where = "" if run is None else f" ({torch.device(device).type}, {run.precision})"
        print(f"Training completed in {history['train_seconds'] / 60:.2f} minutes{where}.")
    return history["train_losses"], history["val_losses"], history["tokens_seen"]


def train_model(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
    **options,
) -> dict:
    """`train_model_simple` that survives interruptions, with a progress bar.

    The same steps, evaluations and printed lines as the book's loop (with fp32, the
    same losses). In addition, these keywords (`course.resumable.LoopOptions`):

    - `checkpoint_path`: everything needed to continue (weights, optimizer, random
      number generators, position in the epoch, losses so far) is saved there after
      every epoch, every `checkpoint_minutes` and every `checkpoint_every` steps. If the
      file exists, training continues from it and ends with the same losses as an
      uninterrupted run. A finished run is not repeated (its weights and losses are
      loaded) unless `force=True`.
    - `run_config`: what else defines the run (model, prompt style, seed, ...); a
      checkpoint saved with other values is not continued.
    - `precision`: "fp32", or "bf16" / "fp16" mixed precision (see choose_precision).
    - `max_steps`: stop after this many steps in this call, with a checkpoint, as if
      interrupted.
    - `interface`: "notebook" or "command line", the words of its messages.

    Returns the history: `train_losses`, `val_losses` and `tokens_seen` (the book's
    three lists), `eval_steps`, `samples` (the text generated after each epoch),
    `global_step`, `train_seconds` and `finished`.
    """
    task = single_process_task(model, train_loader, val_loader, device, eval_iter)
    book = (num_epochs, eval_freq, eval_iter, start_context, tokenizer)
    return run_resumable(task, model, train_loader, optimizer, device, book, **options)
