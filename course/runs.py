"""One fine-tuning run of notebook 05 or `python -m course.finetune`: what identifies it,
how it trains under its lock, and what it leaves (`<run>-sft.pth`, the training log).

`course.training.train_model_simple` reads the run that `use_run` set up here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from course import artifacts
from course.checkpoints import changed_settings, recorded_settings, words_for
from course.resumable import BookLoop, LoopOptions, Task, make_plan, run_resumable, run_settings
from course.run_files import run_lock, set_aside_replaced_run


@dataclass
class Run:
    """What the book's training call cannot say: which run it trains, and how.

    `stem` names its files (course.artifacts.run_stem), `config` is its `run_config`.
    After training, `history` is what `course.training.train_model` returns and
    `training_log` the log written beside `sft_path`.
    """

    stem: str
    config: dict
    precision: str = "fp32"
    retrain: bool = False
    initial_losses: dict | None = None
    interface: str = "notebook"
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 5.0
    max_steps: int | None = None
    show_progress: bool = True
    log_extra: dict = field(default_factory=dict)  # more entries of the log's "config"
    history: dict | None = None
    training_log: dict | None = None

    @property
    def checkpoint_path(self) -> Path:
        return artifacts.path_for("checkpoint", self.stem)

    @property
    def sft_path(self) -> Path:
        return artifacts.path_for("sft", self.stem)

    @property
    def log_path(self) -> Path:
        return artifacts.path_for("training-log", self.stem)


_current: list[Run] = []  # the run use_run set up in this process (at most one)


def use_run(stem: str, config: dict, **options) -> Run:
    """Set up the run that `course.training.train_model_simple` trains next, and return it.

    `options` are Run's fields: precision, retrain (COURSE_RETRAIN), initial_losses
    (for the training log), interface ("notebook" or "command line": the words of its
    messages), checkpoint_every, checkpoint_minutes, max_steps, show_progress, log_extra.
    """
    run = Run(stem, config, **options)
    words_for(run.interface)  # an unknown interface stops here
    _current[:] = [run]
    return run


def current_run() -> Run | None:
    """The run `use_run` set up last, or None."""
    return _current[0] if _current else None


def forget_run() -> None:
    """Forget the run `use_run` set up: `train_model_simple` then trains without files."""
    _current.clear()


def train_run(
    run: Run,
    task: Task,
    model: nn.Module,
    train_loader,
    optimizer: torch.optim.Optimizer,
    device,
    book: BookLoop,
    *,
    main_process: bool = True,
    barrier=None,
) -> dict:
    """Train `run` resumably with `task` and save what it leaves; returns the history.

    The main process holds the run's lock throughout, first sets aside a finished or
    checkpointed run of the same name with other settings (`course.run_files`), and
    at the end writes `-sft.pth` and the training log. Under torchrun the other
    processes pass `main_process=False` and `barrier` (they wait for the set-aside).
    """
    options = LoopOptions(
        checkpoint_path=run.checkpoint_path,
        precision=run.precision,
        run_config=run.config,
        checkpoint_every=run.checkpoint_every,
        checkpoint_minutes=run.checkpoint_minutes,
        force=run.retrain,
        max_steps=run.max_steps,
        show_progress=run.show_progress and main_process,
        save_checkpoints=main_process,
        interface=run.interface,
    )
    plan = make_plan(BookLoop(*book), options)
    words = words_for(run.interface)
    settings = run_settings(optimizer, len(train_loader), plan, run.config)
    guard = run_lock(run.stem, words) if main_process else contextlib.nullcontext()
    with guard:
        reloaded = main_process and finished_before(run, settings)
        if main_process:
            set_aside_replaced_run(run.stem, settings, run.retrain, words)
        if barrier is not None:
            barrier()
        run.history = run_resumable(
            task, model, train_loader, optimizer, device, book, **vars(options)
        )
        if main_process and run.history["finished"]:
            write_results(run, model, device, optimizer, plan, len(train_loader), reloaded)
        if barrier is not None:
            barrier()
    return run.history


def finished_before(run: Run, settings: dict) -> bool:
    """Whether the run is finished with these settings and both its results exist."""
    if run.retrain or not (run.sft_path.exists() and run.log_path.exists()):
        return False
    recorded = recorded_settings(run.checkpoint_path)
    return recorded is not None and recorded[1] and not changed_settings(recorded[0], settings)


def write_results(run, model, device, optimizer, plan, steps_per_epoch, reloaded) -> None:
    """`<stem>-sft.pth` (LoRA merged into plain weights) and the training log of `run`."""
    group = optimizer.param_groups[0]
    run.training_log = training_log(
        run.history,
        run.initial_losses,
        run.config,
        model=model,
        device=device,
        precision=run.precision,
        learning_rate=group["lr"],
        weight_decay=group.get("weight_decay"),
        num_epochs=plan.num_epochs,
        eval_freq=plan.eval_freq,
        eval_iter=plan.eval_iter,
        steps_per_epoch=steps_per_epoch,
    )
    run.training_log["config"].update(run.log_extra)
    if reloaded:  # its files are there, written when it trained: keep what they record
        run.training_log["config"].update(_recorded_extra(run))
        return
    if run.config.get("finetune") == "lora":
        from course.lora import merged_state_dict

        weights = merged_state_dict(model)  # a plain GPTModel state_dict
    else:
        weights = model.state_dict()
    artifacts.torch_save(weights, run.sft_path)
    artifacts.write_training_log(run.stem, run.training_log)
    size_mb = run.sft_path.stat().st_size / 1e6
    print(f"Saved {run.sft_path.name} ({size_mb:.0f} MB) and {run.log_path.name}")


def _recorded_extra(run: Run) -> dict:
    """The entries of `run.log_extra` as the run's training log recorded them."""
    try:
        recorded = artifacts.read_training_log(run.stem)["config"]
    except (artifacts.ArtifactError, KeyError, TypeError):
        return {}
    return {key: recorded[key] for key in run.log_extra if key in recorded}


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
    train_losses, val_losses = history["train_losses"], history["val_losses"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
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
            "trainable_parameters": trainable,
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
