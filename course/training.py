"""Resumable fine-tuning: the book's training loop that survives interruptions.

`helpers.train_model_simple` is the book's loop (listing 7.8 runs chapter 5's). Here
`train_model` takes the same steps with the same evaluations and printed lines and,
with fp32, ends at the same losses; in addition it saves checkpoints (weights,
optimizer, random number generators, position in the epoch), continues an
interrupted run exactly where it stopped, shows a progress bar, uses the fast paths
of `course.speed`, and stops at the first loss that is not a finite number.
`run_resumable` is that loop; `course.dpo.train_model_dpo` runs DPO through it too.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import helpers
from course.artifacts import torch_save
from course.settings import OFFLINE_MODEL, resolve_model_name
from course.speed import (
    autocast_context,
    calc_loss_batch_fast,
    evaluate_model_fast,
    generate_fast,
    keep_freed_memory,
)
from course.weights import load_state_dict_checked, read_pth

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


CHECKPOINT_FORMAT = "course-training-checkpoint-1"


def get_rng_states(data_loader=None) -> dict:
    """The state of every random number generator training draws from.

    PyTorch's (the shuffled order of each epoch, dropout), the GPU's, NumPy's and
    Python's, and the data loader's own generator if it has one.
    """
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            *numpy_state[2:],
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    if data_loader is not None and getattr(data_loader, "generator", None) is not None:
        states["loader"] = data_loader.generator.get_state()
    return states


def set_rng_states(states: dict, data_loader=None) -> None:
    """Put the random number generators back into the states `get_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])
    if "loader" in states and getattr(data_loader, "generator", None) is not None:
        data_loader.generator.set_state(states["loader"])


@dataclass
class Task:
    """What a resumable run trains: the parts in which fine-tuning and DPO differ.

    `run_resumable` does the rest, the same for both: the epochs, the checkpoints and
    continuing from them, the progress bar, the evaluations every `eval_freq` steps,
    stopping at a loss that is not a finite number.
    """

    name: str  # "training" or "DPO", in messages: "the DPO loss", "a training checkpoint"
    checkpoint_format: str  # written into the checkpoint, checked when it is read
    label: str  # the progress bar's: "Fine-tuning" or "DPO"
    notebook: str  # the notebook whose checkpoint it is (in error messages)
    book_lr: str  # the book's learning rate, and the setting that changes it: in the
    lr_setting: str  # message when the loss diverges ("5e-5", "COURSE_LR")
    progress: dict  # the run's own entries of the progress, at the start
    token_counter: str  # the progress entry that counts the tokens trained on
    batch_loss: Callable  # batch -> loss (a tensor with a gradient)
    batch_tokens: Callable  # batch -> the number of tokens it holds
    evaluate: Callable  # (progress, epoch, step) -> (progress bar postfix, line to print)
    history: Callable  # progress -> what the training function returns


def save_training_checkpoint(
    path, model, optimizer, scaler, task, settings, progress, rng, epoch_rng
):
    """Write everything `run_resumable` needs to continue, atomically.

    `epoch_rng` is the generators' state just before the current epoch's shuffle (None
    between epochs); `rng` their state now. A finished run keeps only the weights and
    the history: it is never continued, and the optimizer's state is twice the model.
    """
    finished = progress["finished"]
    checkpoint = {
        "format": task.checkpoint_format,
        "settings": settings,
        "progress": progress,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": None if finished else optimizer.state_dict(),
        "scaler_state_dict": None if finished or scaler is None else scaler.state_dict(),
        "rng": None if finished else rng,
        "epoch_rng": None if finished else epoch_rng,
    }
    torch_save(checkpoint, path)


def load_training_checkpoint(path, model, optimizer, scaler, task, settings) -> dict | None:
    """Read a checkpoint of `run_resumable` into `model`, `optimizer` and `scaler`.

    Returns the checkpoint, or None when it holds a finished run with other settings
    (a new run may replace it). Stops with a clear message when the file is damaged,
    is not such a checkpoint, or holds an unfinished run with other settings
    (continuing it would mix two runs).
    """
    path = Path(path)
    start_over = (
        "Delete it (the training cell then starts from the beginning) or set "
        "COURSE_RETRAIN=1 (force=True) to overwrite it"
    )
    checkpoint = read_pth(path, task.notebook)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != task.checkpoint_format:
        raise ValueError(f"{path} is not a {task.name} checkpoint of this course. {start_over}.")
    saved = checkpoint["settings"]
    changed = [
        f"{key} {saved.get(key)!r} then, {settings.get(key)!r} now"
        for key in sorted(set(saved) | set(settings))
        if saved.get(key) != settings.get(key)
    ]
    if changed and checkpoint["progress"]["finished"]:
        print(f"{path.name} holds a finished run with other settings ({'; '.join(changed)}).")
        return None
    if changed:
        raise ValueError(
            f"{path} holds an unfinished {task.name} run with other settings "
            f"({'; '.join(changed)}), and continuing it would mix two runs. {start_over}, "
            "or change the settings back."
        )
    load_state_dict_checked(model, checkpoint["model_state_dict"], str(path))
    if not checkpoint["progress"]["finished"]:
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"The optimizer state in {path} does not fit this optimizer ({exc}). {start_over}."
            ) from None
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler_state_dict"])
    return checkpoint


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
    checkpoint_path: str | Path | None = None,
    precision: str = "fp32",
    run_config: dict | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = 5.0,
    force: bool = False,
    max_steps: int | None = None,
    show_progress: bool = True,
) -> dict:
    """`train_model_simple` that survives interruptions, with a progress bar.

    The same steps, evaluations and printed lines as the book's loop (with fp32, the
    same losses). In addition:

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

    Returns the history: `train_losses`, `val_losses` and `tokens_seen` (the book's
    three lists), `eval_steps`, `samples` (the text generated after each epoch),
    `global_step`, `train_seconds` and `finished`.
    """
    device = torch.device(device)
    task = fine_tuning_task(
        batch_loss=lambda batch: calc_loss_batch_fast(*batch, model, device),
        batch_tokens=lambda batch: batch[0].numel(),
        evaluate_losses=lambda: evaluate_model_fast(
            model, train_loader, val_loader, device, eval_iter
        ),
    )
    return run_resumable(
        task,
        model,
        train_loader,
        optimizer,
        device,
        num_epochs,
        eval_freq,
        eval_iter,
        start_context,
        tokenizer,
        checkpoint_path=checkpoint_path,
        precision=precision,
        run_config=run_config,
        checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes,
        force=force,
        max_steps=max_steps,
        show_progress=show_progress,
    )


def fine_tuning_task(
    batch_loss: Callable, batch_tokens: Callable, evaluate_losses: Callable
) -> Task:
    """The Task of notebook 05's fine-tuning, for `run_resumable`.

    `batch_loss` (batch -> loss) and `batch_tokens` (batch -> tokens it holds) are one
    step's; `evaluate_losses()` returns the training and validation losses of one
    evaluation. `train_model` passes the fast paths of one process;
    `course.finetune` passes versions that combine several processes.
    """

    def evaluate(progress, epoch, step):
        train_loss, val_loss = evaluate_losses()
        progress["train_losses"].append(train_loss)
        progress["val_losses"].append(val_loss)
        progress["track_tokens_seen"].append(progress["tokens_seen"])
        line = f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
        return {"train": f"{train_loss:.3f}", "val": f"{val_loss:.3f}"}, line

    return Task(
        name="training",
        label="Fine-tuning",
        checkpoint_format=CHECKPOINT_FORMAT,
        notebook="05_instruction_finetuning",
        book_lr="5e-5",
        lr_setting="COURSE_LR",
        progress={"tokens_seen": 0, "train_losses": [], "val_losses": [], "track_tokens_seen": []},
        token_counter="tokens_seen",
        batch_loss=batch_loss,
        batch_tokens=batch_tokens,
        evaluate=evaluate,
        history=training_history,
    )


def run_resumable(
    task: Task,
    model: nn.Module,
    train_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
    checkpoint_path: str | Path | None = None,
    precision: str = "fp32",
    run_config: dict | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = 5.0,
    force: bool = False,
    max_steps: int | None = None,
    show_progress: bool = True,
    save_checkpoints: bool = True,
) -> dict:
    """The resumable loop of `train_model` and `course.dpo.train_model_dpo`: `task` says
    what it trains, the other arguments are theirs.

    `save_checkpoints=False`: this process continues from `checkpoint_path` but never
    writes it (the processes of a `torchrun` run other than rank 0, see course.finetune).
    """
    from tqdm import tqdm  # (tqdm.auto without ipywidgets warns with a machine path)

    device = torch.device(device)
    keep_freed_memory()  # (see course.speed: fewer page faults per step on Linux)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(
            "train_loader has no batches: the training set is smaller than one batch "
            "(drop_last=True). Use more entries or a smaller batch size."
        )
    if eval_freq < 1 or eval_iter < 1:
        raise ValueError(
            f"eval_freq and eval_iter must be at least 1, got {eval_freq}, {eval_iter}."
        )
    settings = {
        "num_epochs": num_epochs,
        "steps_per_epoch": steps_per_epoch,
        "eval_freq": eval_freq,
        "eval_iter": eval_iter,
        "precision": precision,
        "lr": optimizer.param_groups[0]["lr"],
        "weight_decay": optimizer.param_groups[0].get("weight_decay"),
        **(run_config or {}),
    }
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    progress = {
        "epoch": 0,  # the epoch in progress (0-based)
        "batches_done": 0,  # batches of that epoch already trained on
        "global_step": -1,
        **copy.deepcopy(task.progress),  # the losses and what else the task tracks
        "eval_steps": [],
        "samples": [],
        "train_seconds": 0.0,
        "finished": False,
    }
    resume = None
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        if checkpoint_path.exists() and not force:
            resume = load_training_checkpoint(
                checkpoint_path, model, optimizer, scaler, task, settings
            )
        if checkpoint_path.exists() and resume is None:
            print(f"Training from the start ({checkpoint_path.name} will be replaced).")
    if resume is not None:
        progress = resume["progress"]
        if progress["finished"]:
            print(
                f"This run already finished ({checkpoint_path.name}): its trained weights "
                f"are loaded. Final losses: train {progress['train_losses'][-1]:.3f}, val "
                f"{progress['val_losses'][-1]:.3f}. Set COURSE_RETRAIN=1 (force=True) to "
                "train again."
            )
            return task.history(progress)
        print(
            f"Continuing from {checkpoint_path.name}: epoch {progress['epoch'] + 1}, "
            f"{progress['global_step'] + 1} of {num_epochs * steps_per_epoch} steps done."
        )

    start_time = time.perf_counter()
    seconds_before = progress["train_seconds"]
    last_save = start_time
    steps_this_call = 0
    bar = tqdm(
        total=num_epochs * steps_per_epoch,
        initial=progress["global_step"] + 1,
        desc=task.label,
        unit="step",
        disable=not show_progress,
    )

    def save(epoch_rng):
        progress["train_seconds"] = seconds_before + time.perf_counter() - start_time
        if not save_checkpoints:
            return
        save_training_checkpoint(
            checkpoint_path,
            model,
            optimizer,
            scaler,
            task,
            settings,
            progress,
            get_rng_states(train_loader),
            epoch_rng,
        )

    try:
        for epoch in range(progress["epoch"], num_epochs):
            model.train()
            if resume is not None:  # replay the shuffle of the epoch that was interrupted
                set_rng_states(resume["epoch_rng"] or resume["rng"], train_loader)
            epoch_rng = get_rng_states(train_loader)  # what this epoch's order comes from
            batches = iter(train_loader)
            if resume is not None:
                if progress["batches_done"] > 0:  # interrupted inside the epoch
                    for _ in range(progress["batches_done"]):  # already trained on
                        next(batches)
                    # then the generators as they were when the checkpoint was saved
                    set_rng_states(resume["rng"], train_loader)
                # (at an epoch's start the state restored above is already the right
                # one: restoring it again after iter() would undo the loader's draw)
                resume = None
            for batch in batches:
                optimizer.zero_grad()
                with autocast_context(device, precision):
                    loss = task.batch_loss(batch)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(
                        f"The {task.name} loss is {loss.item()} at step "
                        f"{progress['global_step'] + 1}: training diverged (a learning rate "
                        f"of {settings['lr']} may be too large; the book uses {task.book_lr}). "
                        f"Nothing was saved as finished. Lower {task.lr_setting} and set "
                        "COURSE_RETRAIN=1 to start over."
                    )
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                progress[task.token_counter] += task.batch_tokens(batch)
                progress["global_step"] += 1
                progress["batches_done"] += 1
                step = progress["global_step"]
                steps_this_call += 1
                bar.update(1)
                if step % eval_freq == 0:
                    with autocast_context(device, precision):
                        postfix, line = task.evaluate(progress, epoch, step)
                    progress["eval_steps"].append(step)
                    bar.set_postfix(postfix)
                    tqdm.write(line)
                stop = max_steps is not None and steps_this_call >= max_steps
                due = (checkpoint_every is not None and (step + 1) % checkpoint_every == 0) or (
                    checkpoint_minutes is not None
                    and time.perf_counter() - last_save >= 60 * checkpoint_minutes
                )
                # (after an epoch's last batch the end-of-epoch checkpoint follows)
                if checkpoint_path is not None and (
                    stop or (due and progress["batches_done"] < steps_per_epoch)
                ):
                    save(epoch_rng)
                    last_save = time.perf_counter()
                if stop:
                    bar.close()
                    print(
                        f"Stopped after {steps_this_call} steps (max_steps), at step "
                        f"{step + 1} of {num_epochs * steps_per_epoch}."
                        + (" Run again to continue." if checkpoint_path is not None else "")
                    )
                    progress["train_seconds"] = seconds_before + time.perf_counter() - start_time
                    return task.history(progress)
            bar.refresh()
            progress["samples"].append(print_sample(model, tokenizer, device, start_context))
            progress["epoch"], progress["batches_done"] = epoch + 1, 0
            if checkpoint_path is not None and epoch + 1 < num_epochs:
                save(None)
                last_save = time.perf_counter()
        progress["finished"] = True
        progress["train_seconds"] = seconds_before + time.perf_counter() - start_time
        if checkpoint_path is not None:
            save(None)
    except KeyboardInterrupt:
        bar.close()
        if checkpoint_path is not None and checkpoint_path.exists():
            print(
                f"Interrupted. The last checkpoint is in {checkpoint_path.name}: run the "
                "cell again to continue from there."
            )
        elif checkpoint_path is not None:
            print("Interrupted before the first checkpoint: training starts anew next time.")
        raise
    finally:
        bar.close()
    return task.history(progress)


def training_history(progress: dict) -> dict:
    """What `train_model` returns: the losses so far and where training stands."""
    return {
        "train_losses": list(progress["train_losses"]),
        "val_losses": list(progress["val_losses"]),
        "tokens_seen": list(progress["track_tokens_seen"]),
        "eval_steps": list(progress["eval_steps"]),
        "samples": list(progress["samples"]),
        "global_step": progress["global_step"],
        "train_seconds": progress["train_seconds"],
        "finished": progress["finished"],
    }


def print_sample(model, tokenizer, device, start_context: str) -> str:
    """`helpers.generate_and_print_sample` with `generate_fast` (the same tokens)."""
    model.eval()
    encoded = helpers.text_to_token_ids(start_context, tokenizer).to(device)
    context_size = model.pos_emb.weight.shape[0]
    token_ids = generate_fast(model, encoded, max_new_tokens=50, context_size=context_size)
    text = helpers.token_ids_to_text(token_ids, tokenizer)
    print(text.replace("\n", " "))
    model.train()
    return text


def run_config(
    model_name: str,
    dataset_tag: str,
    train_data: list,
    *,
    prompt_style: str,
    mask_instructions: bool,
    data_limit: int,
    finetune: str,
    lora_rank: int,
    lora_alpha: float,
    batch_size: int,
    seed: int,
) -> dict:
    """What identifies notebook 05's run, besides the optimizer's settings.

    `train_model` saves it in the checkpoint and does not continue a checkpoint saved
    with other values. The training data enters as its fingerprint; the LoRA rank and
    alpha only for a LoRA run.
    """
    from course.data import data_fingerprint

    lora = finetune == "lora"
    return {
        "model": model_name,
        "prompt_style": prompt_style,
        "mask_instructions": mask_instructions,
        "dataset": dataset_tag,
        "data_limit": data_limit,
        "finetune": finetune,
        "lora_rank": lora_rank if lora else None,
        "lora_alpha": lora_alpha if lora else None,
        "batch_size": batch_size,
        "seed": seed,
        "train_data": data_fingerprint(train_data),
    }


def training_log(
    history: dict,
    initial_losses: dict,
    config: dict,
    *,
    model: nn.Module,
    device,
    precision: str,
    learning_rate: float,
    weight_decay: float,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    steps_per_epoch: int,
) -> dict:
    """Notebook 05's training log of a finished run, for `course.artifacts.write_training_log`.

    `history` is what `train_model` returned, `config` the run's `run_config`. The log
    keeps what notebook 06 plots (losses, tokens seen, epochs seen at each evaluation)
    and, under "config", what was trained (the run_config without the data's
    fingerprint, the hyper-parameters and the number of trainable parameters), which
    notebooks 06-09 follow.
    """
    from course.lora import count_parameters

    train_losses, val_losses = history["train_losses"], history["val_losses"]
    return {
        "model": config["model"],
        "device": str(device),
        "precision": precision,
        "torch_version": torch.__version__,
        "config": {
            **{key: value for key, value in config.items() if key != "train_data"},
            "learning_rate": learning_rate,
            "weight_decay": weight_decay,
            "num_epochs": num_epochs,
            "eval_freq": eval_freq,
            "eval_iter": eval_iter,
            "steps_per_epoch": steps_per_epoch,
            "trainable_parameters": count_parameters(model)["trainable"],
        },
        "initial_losses": initial_losses,
        "train_losses": train_losses,
        "val_losses": val_losses,
        "tokens_seen": history["tokens_seen"],
        "epochs_seen": torch.linspace(0, num_epochs, len(train_losses)).tolist(),
        "eval_steps": history["eval_steps"],
        "final_losses": {"train": train_losses[-1], "val": val_losses[-1]},
        "duration_minutes": history["train_seconds"] / 60,
        "samples": history["samples"],
    }
