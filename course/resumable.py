"""The resumable training loop: the book's steps, with checkpoints and continuing from them.

`run_resumable` runs notebook 05's fine-tuning (through `course.training`, also for
`python -m course.finetune`) and notebook 10's DPO (`course.dpo`); a `Task` says which.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import helpers
from course.checkpoints import (
    CHECKPOINT_FORMAT,
    get_rng_states,
    load_training_checkpoint,
    save_training_checkpoint,
    sentence,
    set_rng_states,
    words_for,
)
from course.speed import autocast_context, generate_fast, keep_freed_memory


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


class BookLoop(NamedTuple):
    """The book's loop arguments after the device (listing 7.8): how long, how it reports."""

    num_epochs: int
    eval_freq: int
    eval_iter: int
    start_context: str
    tokenizer: object


@dataclass
class LoopOptions:
    """The keywords of `run_resumable`, `course.training.train_model` and
    `course.dpo.train_model_dpo` beyond the book's arguments (see train_model)."""

    checkpoint_path: str | Path | None = None
    precision: str = "fp32"
    run_config: dict | None = None
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 5.0
    force: bool = False
    max_steps: int | None = None
    show_progress: bool = True
    save_checkpoints: bool = True
    interface: str = "notebook"

    def __post_init__(self):
        if self.checkpoint_path is not None:
            self.checkpoint_path = Path(self.checkpoint_path)


@dataclass(kw_only=True)
class Plan(LoopOptions):
    """How `run_resumable` runs: the book's loop arguments and the options."""

    num_epochs: int
    eval_freq: int
    eval_iter: int
    start_context: str
    tokenizer: object


def make_plan(book: BookLoop, options: LoopOptions) -> Plan:
    """The book's arguments and the options in one `Plan`."""
    return Plan(**book._asdict(), **vars(options))


def run_settings(optimizer, steps_per_epoch: int, plan: Plan, run_config: dict | None) -> dict:
    """What a checkpoint records of its run: the loop's settings, the optimizer's, run_config."""
    return {
        "num_epochs": plan.num_epochs,
        "steps_per_epoch": steps_per_epoch,
        "eval_freq": plan.eval_freq,
        "eval_iter": plan.eval_iter,
        "precision": plan.precision,
        "lr": optimizer.param_groups[0]["lr"],
        "weight_decay": optimizer.param_groups[0].get("weight_decay"),
        **(run_config or {}),
    }


def check_loop_arguments(train_loader, eval_freq: int, eval_iter: int) -> None:
    """Stop before training when the loader is empty or the evaluation is never due."""
    if len(train_loader) == 0:
        raise ValueError(
            "train_loader has no batches: the training set is smaller than one batch "
            "(drop_last=True). Use more entries or a smaller batch size."
        )
    if eval_freq < 1 or eval_iter < 1:
        raise ValueError(
            f"eval_freq and eval_iter must be at least 1, got {eval_freq}, {eval_iter}."
        )


def run_resumable(task: Task, model, train_loader, optimizer, device, book, **options) -> dict:
    """The resumable loop of `course.training.train_model` and `course.dpo.train_model_dpo`:
    `task` says what it trains, `book` the book's loop arguments (`BookLoop`), `options`
    the keywords of `LoopOptions`.

    `save_checkpoints=False`: this process continues from `checkpoint_path` but never
    writes it (the processes of a `torchrun` run other than rank 0, see course.finetune).
    `interface` ("notebook" or "command line") chooses the words of its messages.
    """
    book, options = BookLoop(*book), LoopOptions(**options)  # an unknown keyword stops here
    words_for(options.interface)  # and so does an unknown interface
    check_loop_arguments(train_loader, book.eval_freq, book.eval_iter)
    plan = make_plan(book, options)
    settings = run_settings(optimizer, len(train_loader), plan, options.run_config)
    loop = _Loop(task, model, train_loader, optimizer, torch.device(device), plan, settings)
    return loop.run()


class _Loop:
    """One call of `run_resumable`: restore, then epochs of steps, evaluations and saves."""

    def __init__(self, task, model, train_loader, optimizer, device, plan, settings):
        self.task, self.model, self.loader, self.optimizer = task, model, train_loader, optimizer
        self.device, self.plan, self.settings = device, plan, settings
        self.words = words_for(plan.interface)
        self.total_steps = plan.num_epochs * len(train_loader)
        self.scaler = torch.amp.GradScaler("cuda") if plan.precision == "fp16" else None
        self.progress = {
            "epoch": 0,  # the epoch in progress (0-based)
            "batches_done": 0,  # batches of that epoch already trained on
            "global_step": -1,
            **copy.deepcopy(task.progress),  # the losses and what else the task tracks
            "eval_steps": [],
            "samples": [],
            "train_seconds": 0.0,
            "finished": False,
        }
        self.resume = None  # the checkpoint continued from, until its epoch has started
        self.steps_this_call = 0

    def run(self) -> dict:
        """Restore, train the remaining epochs, finish; the task's history in every case."""
        keep_freed_memory()  # (see course.speed: fewer page faults per step on Linux)
        if self.restore():
            return self.task.history(self.progress)  # a finished run: nothing to train
        self.start_clock()
        try:
            for epoch in range(self.progress["epoch"], self.plan.num_epochs):
                if self.train_epoch(epoch):
                    return self.task.history(self.progress)  # stopped at max_steps
                self.end_epoch(epoch)
            self.finish()
        except KeyboardInterrupt:
            self.bar.close()
            self.report_interrupt()
            raise
        finally:
            self.bar.close()
        return self.task.history(self.progress)

    # -- restore ----------------------------------------------------------------------

    def restore(self) -> bool:
        """Continue from the checkpoint if there is one; True when its run had finished."""
        path, plan = self.plan.checkpoint_path, self.plan
        if path is None or not path.exists():
            return False
        if not plan.force:
            self.resume = load_training_checkpoint(
                path,
                self.model,
                self.optimizer,
                self.scaler,
                self.task,
                self.settings,
                plan.interface,
            )
        if self.resume is None:
            print(f"Training from the start ({path.name} will be replaced).")
            return False
        self.progress = self.resume["progress"]
        if self.progress["finished"]:
            print(
                f"This run already finished ({path.name}): its trained weights are loaded. "
                f"Final losses: train {self.progress['train_losses'][-1]:.3f}, val "
                f"{self.progress['val_losses'][-1]:.3f}. {sentence(self.words.retrain)} "
                "to train again."
            )
            return True
        print(
            f"Continuing from {path.name}: epoch {self.progress['epoch'] + 1}, "
            f"{self.progress['global_step'] + 1} of {self.total_steps} steps done."
        )
        return False

    def epoch_batches(self):
        """This epoch's batches; after a restore, the shuffle replayed and the done ones skipped."""
        resume = self.resume
        if resume is not None:  # replay the shuffle of the epoch that was interrupted
            set_rng_states(resume["epoch_rng"] or resume["rng"], self.loader)
        self.epoch_rng = get_rng_states(self.loader)  # what this epoch's order comes from
        batches = iter(self.loader)
        if resume is not None:
            if self.progress["batches_done"] > 0:  # interrupted inside the epoch
                for _ in range(self.progress["batches_done"]):  # already trained on
                    next(batches)
                # then the generators as they were when the checkpoint was saved
                set_rng_states(resume["rng"], self.loader)
            # (at an epoch's start the state restored above is already the right one:
            # restoring it again after iter() would undo the loader's draw)
            self.resume = None
        return batches

    # -- the epochs and steps --------------------------------------------------------------

    def start_clock(self) -> None:
        from tqdm import tqdm  # (tqdm.auto without ipywidgets warns with a machine path)

        self.start_time = self.last_save = time.perf_counter()
        self.seconds_before = self.progress["train_seconds"]
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.progress["global_step"] + 1,
            desc=self.task.label,
            unit="step",
            disable=not self.plan.show_progress,
        )

    def train_epoch(self, epoch: int) -> bool:
        """One epoch's steps, evaluations and checkpoints; True when max_steps stopped it."""
        self.model.train()
        for batch in self.epoch_batches():
            self.step(batch)
            self.evaluate_if_due(epoch)
            if self.checkpoint_if_due():
                return True
        return False

    def step(self, batch) -> None:
        """One optimizer step on `batch`, stopping at a loss that is not a finite number."""
        self.optimizer.zero_grad()
        with autocast_context(self.device, self.plan.precision):
            loss = self.task.batch_loss(batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(self.diverged(loss.item()))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        progress = self.progress
        progress[self.task.token_counter] += self.task.batch_tokens(batch)
        progress["global_step"] += 1
        progress["batches_done"] += 1
        self.steps_this_call += 1
        self.bar.update(1)

    def diverged(self, loss: float) -> str:
        task, words = self.task, self.words
        return (
            f"The {task.name} loss is {loss} at step {self.progress['global_step'] + 1}: "
            f"training diverged (a learning rate of {self.settings['lr']} may be too large; "
            f"the book uses {task.book_lr}). Nothing was saved as finished. Lower "
            f"{words.setting(task.lr_setting)} and {words.retrain} to start over."
        )

    def evaluate_if_due(self, epoch: int) -> None:
        """Every `eval_freq` steps: the task's evaluation, printed as the book prints it."""
        from tqdm import tqdm

        step = self.progress["global_step"]
        if step % self.plan.eval_freq != 0:
            return
        with autocast_context(self.device, self.plan.precision):
            postfix, line = self.task.evaluate(self.progress, epoch, step)
        self.progress["eval_steps"].append(step)
        self.bar.set_postfix(postfix)
        tqdm.write(line)

    def end_epoch(self, epoch: int) -> None:
        """The book's sample after each epoch, then a checkpoint unless it was the last."""
        self.bar.refresh()
        sample = print_sample(self.model, self.plan.tokenizer, self.device, self.plan.start_context)
        self.progress["samples"].append(sample)
        self.progress["epoch"], self.progress["batches_done"] = epoch + 1, 0
        if epoch + 1 < self.plan.num_epochs:
            self.save(None)

    def finish(self) -> None:
        """Mark the run finished and save it so (weights and history only)."""
        self.progress["finished"] = True
        self.save(None)

    # -- checkpoints --------------------------------------------------------------------

    def checkpoint_if_due(self) -> bool:
        """Save when max_steps stops the call or a checkpoint is due; True when stopped."""
        plan, step = self.plan, self.progress["global_step"]
        stop = plan.max_steps is not None and self.steps_this_call >= plan.max_steps
        due = (plan.checkpoint_every is not None and (step + 1) % plan.checkpoint_every == 0) or (
            plan.checkpoint_minutes is not None
            and time.perf_counter() - self.last_save >= 60 * plan.checkpoint_minutes
        )
        # (after an epoch's last batch the end-of-epoch checkpoint follows)
        if stop or (due and self.progress["batches_done"] < len(self.loader)):
            self.save(self.epoch_rng)
        if stop:
            self.bar.close()
            print(
                f"Stopped after {self.steps_this_call} steps (max_steps), at step "
                f"{step + 1} of {self.total_steps}."
                + (f" {sentence(self.words.again)} to continue." if plan.checkpoint_path else "")
            )
        return stop

    def save(self, epoch_rng) -> None:
        """Record the time trained; write the checkpoint where this process writes one."""
        now = time.perf_counter()
        self.progress["train_seconds"] = self.seconds_before + now - self.start_time
        if self.plan.checkpoint_path is None or not self.plan.save_checkpoints:
            return
        save_training_checkpoint(
            self.plan.checkpoint_path,
            self.model,
            self.optimizer,
            self.scaler,
            self.task,
            self.settings,
            self.progress,
            get_rng_states(self.loader),
            epoch_rng,
        )
        self.last_save = time.perf_counter()

    def report_interrupt(self) -> None:
        """Ctrl+C or the stop button: say where the run can continue from."""
        path = self.plan.checkpoint_path
        if path is not None and path.exists():
            print(
                f"Interrupted. The last checkpoint is in {path.name}: {self.words.again} "
                "to continue from there."
            )
        elif path is not None:
            print("Interrupted before the first checkpoint: training starts anew next time.")


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


def fine_tuning_task(
    batch_loss: Callable, batch_tokens: Callable, evaluate_losses: Callable
) -> Task:
    """The Task of notebook 05's fine-tuning, for `run_resumable`.

    `batch_loss` (batch -> loss) and `batch_tokens` (batch -> tokens it holds) are one
    step's; `evaluate_losses()` returns the training and validation losses of one
    evaluation. `course.training` passes the fast paths of one process;
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
