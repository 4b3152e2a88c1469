"""Notebook 05's fine-tuning from the command line: `python -m course.finetune`, or under
torchrun on several processes (course.distributed). Used for long or multi-GPU runs; it
writes the artifacts that notebooks 06-09 and `run_course.py --from 06` read.
"""

#     python -m course.finetune --offline                     # the tiny offline model
#     python -m course.finetune --dataset alpaca              # exercise 7.3 on one GPU
#     torchrun --nproc-per-node 4 -m course.finetune --dataset alpaca --batch-size 2
#
# It runs notebook 05's cells with the same settings (the COURSE_* variables, which the
# flags set) and writes the same `<run>-sft.pth` and `<run>-training-log.json`; in one
# process it computes exactly what the notebook computes. Under torchrun (or `python -m
# torch.distributed.run`) `--batch-size` is each process's batch, the global batch is
# that times N, and the run equals one process with the global batch within float
# rounding (course.distributed says how). Only rank 0 prints and writes files. The
# checkpoint records the global batch, so another number of processes with the same
# global batch continues it. When a process fails, torchrun stops the others, which say
# that the last checkpoint is intact and that the same command continues.

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader

import helpers
from course import artifacts, command_line, data, lora, settings, speed, training, weights
from course.distributed import (
    Processes,
    ShardedBatches,
    choose_device,
    collate_part,
    sharded_loader_loss,
    sharded_task,
)

EVAL_FREQ, EVAL_ITER = 5, 5  # notebook 05's evaluation schedule (the book's)

# command-line flag -> the COURSE_* variable notebook 05's parameters cell reads:
# run_course.py's flags, less those of the judge and of the evaluated stage
OPTIONS = [
    (flag, name, "batch size of each process (8)" if flag == "--batch-size" else text)
    for flag, name, text in settings.COMMAND_LINE_OPTIONS
    if name not in ("COURSE_JUDGE_MODEL", "COURSE_JUDGE_RUNS", "COURSE_STAGE")
]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl+C inside the training loop, which has said where it stopped."""


# -- the command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m course.finetune",
        description=(
            "Notebook 05's fine-tuning from the command line, with its settings and "
            "artifacts; under torchrun on several processes (DistributedDataParallel)."
        ),
        epilog="Several GPUs: torchrun --nproc-per-node 4 -m course.finetune --dataset alpaca",
    )
    command_line.add_course_flags(
        parser,
        OPTIONS,
        artifacts_help="folder for the artifacts, from the current folder; sets COURSE_ARTIFACTS",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train again although a run finished; sets COURSE_RETRAIN",
    )
    parser.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=5.0,
        help="save a checkpoint this often (5, as the notebook), and after every epoch",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, help="also save a checkpoint every this many steps"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps, with a checkpoint (the same command continues)",
    )
    args = parser.parse_args(argv)
    command_line.check_course_flags(parser, args)
    for name in ("checkpoint_every", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if not args.checkpoint_minutes > 0:
        parser.error("--checkpoint-minutes must be above 0.")
    return args


def apply_flags(args: argparse.Namespace) -> None:
    """Set the COURSE_* variables the flags name, as run_course.py does."""
    os.environ.update(command_line.course_variables(args, OPTIONS, os.environ))
    if args.retrain:
        os.environ["COURSE_RETRAIN"] = "true"


def read_settings() -> dict:
    """Notebook 05's parameters cell."""
    setting = settings.setting
    return {
        "CHOOSE_MODEL": setting("COURSE_MODEL", "gpt2-medium (355M)"),
        "PROMPT_STYLE": setting("COURSE_PROMPT_STYLE", "alpaca"),
        "MASK_INSTRUCTIONS": setting("COURSE_MASK_INSTRUCTIONS", False),
        "DATASET": setting("COURSE_DATASET", "book"),
        "DATA_LIMIT": setting("COURSE_DATA_LIMIT", 0),
        "MAX_LENGTH": setting("COURSE_MAX_LENGTH", 1024),
        "FINETUNE": setting("COURSE_FINETUNE", "full"),
        "LORA_RANK": setting("COURSE_LORA_RANK", 16),
        "LORA_ALPHA": setting("COURSE_LORA_ALPHA", 16),
        "BATCH_SIZE": setting("COURSE_BATCH_SIZE", 8),
        "LEARNING_RATE": setting("COURSE_LR", 5e-5),
        "WEIGHT_DECAY": setting("COURSE_WEIGHT_DECAY", 0.1),
        "NUM_EPOCHS": setting("COURSE_EPOCHS", 2),
        "SEED": setting("COURSE_SEED", 123),
        "DEVICE": setting("COURSE_DEVICE", "auto"),
        "PRECISION": setting("COURSE_PRECISION", "auto"),
        "MODELS_DIR": setting("COURSE_MODELS_DIR", "gpt2"),
        "RETRAIN": setting("COURSE_RETRAIN", False),
    }


# -- notebook 05's cells ------------------------------------------------------------------


@dataclass
class Plan:
    """What this run trains: notebook 05's parameters, the names they give, the processes."""

    p: dict
    model_name: str
    dataset_tag: str
    stem: str
    processes: Processes

    @classmethod
    def read(cls, processes: Processes) -> Plan:
        p = read_settings()
        model_name = settings.resolve_model_name(p["CHOOSE_MODEL"])
        dataset_tag = settings.dataset_tag(p["DATASET"], p["DATA_LIMIT"])
        stem = artifacts.run_stem(
            model_name,
            dataset_tag,
            p["FINETUNE"],
            p["PROMPT_STYLE"],
            p["MASK_INSTRUCTIONS"],
            p["MAX_LENGTH"],
        )
        return cls(p, model_name, dataset_tag, stem, processes)

    @property
    def global_batch(self) -> int:
        return self.p["BATCH_SIZE"] * self.processes.world_size


def start(plan: Plan) -> tuple[torch.device, str]:
    """The device and precision; with several processes, joining the process group."""
    processes = plan.processes
    device = choose_device(plan.p["DEVICE"], processes)
    print("Device:", device)
    precision = speed.choose_precision(device, plan.p["PRECISION"])
    if processes.several:
        backend = processes.start(device)
        print(
            f"{processes.world_size} processes ({backend}): batch {plan.p['BATCH_SIZE']} "
            f"per process, global batch {plan.global_batch}"
        )
    return device, precision


def ensure_split(processes: Processes) -> None:
    """Notebook 01's split of the data; rank 0 makes it as notebook 01 does when missing."""
    path = artifacts.split_path()

    def make_split():
        if path.exists():
            return
        print(
            f"No split {path.name} in {path.parent} yet (notebook "
            f"{artifacts.WRITTEN_BY['split']} makes it): making it as that notebook does."
        )
        split = data.save_split(data.load_course_data())
        print("Saved", path.name, "with", {k: len(split[k]) for k in ("train", "val", "test")})

    processes.rank_0_first("make the split", make_split)


def make_loaders(plan: Plan, device: torch.device) -> tuple[tuple, tuple]:
    """Notebook 05's data: (train, validation, test) entries and their loaders."""
    p, processes = plan.p, plan.processes
    ensure_split(processes)
    entries = data.load_split()
    tokenizer = helpers.get_tokenizer()
    collate = partial(
        helpers.custom_collate_fn,
        device=device,
        allowed_max_length=p["MAX_LENGTH"],
        mask_instructions=p["MASK_INSTRUCTIONS"],
    )

    def make_loader(entries, shuffle):
        dataset = helpers.InstructionDataset(
            entries,
            tokenizer,
            style=p["PROMPT_STYLE"],
            with_instruction_length=p["MASK_INSTRUCTIONS"],
        )
        batches = ShardedBatches(
            len(dataset), p["BATCH_SIZE"], processes.rank, processes.world_size, shuffle
        )
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=partial(collate_part, collate=collate),
            num_workers=0,
        )

    torch.manual_seed(p["SEED"])
    loaders = tuple(
        make_loader(e, shuffle) for e, shuffle in zip(entries, (True, False, False), strict=True)
    )
    print("Entries: train {}, validation {}, test {}".format(*map(len, entries)))
    print("Batches per epoch: train {}, validation {}, test {}".format(*map(len, loaders)))
    if len(loaders[0]) == 0:
        raise ValueError(
            f"The training set has {len(entries[0])} entries, fewer than one global batch "
            f"of {plan.global_batch}: use a smaller --batch-size or more data."
        )
    return entries, loaders


def load_pretrained(model_name: str, models_dir: str, processes: Processes):
    """Notebook 05's pretrained model; rank 0 downloads it first, the others then read it."""
    size = settings.model_size(model_name)
    _, params = processes.rank_0_first(
        "download GPT-2", lambda: weights.load_gpt2(size, models_dir)
    )
    model = helpers.GPTModel(settings.model_config(model_name))
    weights.load_weights_into_gpt(model, params)
    return model


def initial_losses(model, loaders, device, plan: Plan) -> dict:
    """The losses before fine-tuning (the book's calc_loss_loader), and their check."""
    model.eval()
    torch.manual_seed(plan.p["SEED"])
    with torch.no_grad():
        if plan.processes.several:

            def book_loss(part):
                return helpers.calc_loss_batch(*part, model, device)

            train_loss, val_loss = (
                sharded_loader_loss(loader, book_loss, plan.processes, device, 5)
                for loader in loaders[:2]
            )
        else:
            train_loss, val_loss = (
                helpers.calc_loss_loader(loader, model, device, num_batches=5)
                for loader in loaders[:2]
            )
    print("Training loss:", train_loss)
    print("Validation loss:", val_loss)
    training.check_initial_loss(val_loss, plan.model_name)
    return {"train": train_loss, "val": val_loss}


def prepare_finetuning(model, p: dict) -> None:
    """Full fine-tuning, or LoRA's adapters on the frozen model (exercise 7.4)."""
    if p["FINETUNE"] == "lora":
        torch.manual_seed(p["SEED"])
        counts = lora.apply_lora(model, p["LORA_RANK"], p["LORA_ALPHA"])
        print(
            f"LoRA (rank {p['LORA_RANK']}, alpha {p['LORA_ALPHA']}): trainable parameters "
            f"{counts['before']['trainable']:,} before, {counts['after']['trainable']:,} after"
        )
    else:
        trainable = lora.parameter_counts(model)["trainable"]
        print(f"Full fine-tuning: all {trainable:,} parameters train.")


def train(model, entries, loaders, device, precision, plan: Plan, args, initial) -> dict:
    """The book's training loop, resumable, in the run's lock; rank 0 saves the results.

    `course.training.train_run` sets aside a run of this name with other settings,
    trains, writes `-sft.pth` and the training log, and speaks the command line's words.
    """
    p, processes = plan.p, plan.processes
    run_config = training.run_config(
        plan.model_name,
        plan.dataset_tag,
        entries[0],
        prompt_style=p["PROMPT_STYLE"],
        mask_instructions=p["MASK_INSTRUCTIONS"],
        data_limit=p["DATA_LIMIT"],
        finetune=p["FINETUNE"],
        lora_rank=p["LORA_RANK"],
        lora_alpha=p["LORA_ALPHA"],
        batch_size=plan.global_batch,  # what one step learns from, whatever the processes
        seed=p["SEED"],
    )
    run = training.use_run(
        plan.stem,
        run_config,
        precision=precision,
        retrain=p["RETRAIN"],
        initial_losses=initial,
        interface="command line",
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        max_steps=args.max_steps,
        log_extra={"processes": processes.world_size, "per_process_batch_size": p["BATCH_SIZE"]},
    )
    torch.manual_seed(p["SEED"])
    optimizer = speed.make_optimizer(model, lr=p["LEARNING_RATE"], weight_decay=p["WEIGHT_DECAY"])
    if processes.several:
        task = sharded_task(model, loaders[0], loaders[1], device, processes, EVAL_ITER)
    else:
        task = training.single_process_task(model, loaders[0], loaders[1], device, EVAL_ITER)
    try:
        start_context = helpers.format_input(entries[1][0], p["PROMPT_STYLE"])
        book = (p["NUM_EPOCHS"], EVAL_FREQ, EVAL_ITER, start_context, helpers.get_tokenizer())
        return training.train_run(
            run,
            task,
            model,
            loaders[0],
            optimizer,
            device,
            book,
            main_process=processes.main,
            barrier=processes.patient_barrier if processes.several else None,
        )
    except KeyboardInterrupt:
        raise TrainingInterrupted from None


def report(history: dict, plan: Plan, device, precision: str, steps_per_epoch: int) -> None:
    """What notebook 05 prints after training."""
    processes = plan.processes
    where = f"{processes.world_size} processes on {device.type}" if processes.several else device
    print(f"Training took {history['train_seconds'] / 60:.2f} minutes on {where} ({precision}).")
    if plan.model_name == settings.OFFLINE_MODEL:
        print(
            "This is the offline model: tiny, with random weights. Its losses fall, but its "
            "samples stay noise; they only show that the code runs."
        )
    if not history["finished"]:
        print("Training has not finished: the same command continues it.")
        return
    print(
        f"{plan.p['NUM_EPOCHS']} epochs of {steps_per_epoch} steps: "
        f"{history['global_step'] + 1} steps in all"
    )
    print(
        f"{len(history['train_losses'])} evaluations, at steps "
        f"{history['eval_steps'][:3]} ... {history['eval_steps'][-1]}"
    )
    print(f"Tokens seen: {history['tokens_seen'][-1]:,} at the last evaluation")
    final = f"train {history['train_losses'][-1]:.3f}, validation {history['val_losses'][-1]:.3f}"
    print(f"Final losses: {final}")
    print("Next: notebook 06, or python run_course.py --from 06 with the same settings.")


def run(args: argparse.Namespace, processes: Processes) -> int:
    """Notebook 05's cells, in order."""
    plan = Plan.read(processes)
    device, precision = start(plan)
    entries, loaders = make_loaders(plan, device)
    model = load_pretrained(plan.model_name, plan.p["MODELS_DIR"], processes)
    model.to(device)
    print(f"Loaded {plan.model_name} on {device}")
    initial = initial_losses(model, loaders, device, plan)
    prepare_finetuning(model, plan.p)
    history = train(model, entries, loaders, device, precision, plan, args, initial)
    report(history, plan, device, precision, len(loaders[0]))
    return 0


# -- how a run ends -----------------------------------------------------------------------


def failure_advice() -> str:
    """What a stopped run leaves behind: its last checkpoint, or none."""
    try:
        stem = artifacts.run_stem(
            settings.setting("COURSE_MODEL"),
            settings.dataset_tag(),
            settings.setting("COURSE_FINETUNE"),
            settings.setting("COURSE_PROMPT_STYLE"),
            settings.setting("COURSE_MASK_INSTRUCTIONS"),
        )
        path = artifacts.path_for("checkpoint", stem)
    except Exception:  # the settings themselves are wrong: the error says so
        return ""
    if path.exists():
        return (
            f"The last checkpoint, {path.name} in {path.parent}, is intact (each save "
            "replaces the whole file at once): the same command continues from it."
        )
    return "No checkpoint was saved yet: run the same command again to start anew."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_flags(args)
    processes = Processes()
    if processes.several and not processes.main:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints (errors still show)
    if processes.several:  # torchrun stops the other processes with SIGTERM when one fails
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    who = f"Process {processes.rank} of {processes.world_size}: " if processes.several else ""
    try:
        status = run(args, processes)
    except (
        settings.SettingError,
        artifacts.ArtifactError,
        data.DatasetError,
        FloatingPointError,
        ValueError,
    ) as exc:  # the settings, the data or the checkpoint: the message says what to do
        print(f"{who}Error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, settings.SettingError) else 1
    except KeyboardInterrupt as exc:
        # (in one process, the training loop has said where it stopped)
        if processes.several or not isinstance(exc, TrainingInterrupted):
            print(f"\n{who}Stopped by Ctrl+C. {failure_advice()}", file=sys.stderr, flush=True)
        return 130
    except (Exception, SystemExit) as exc:
        if not processes.several:
            raise
        why = (
            "torchrun stopped it (another process of the run failed)"
            if isinstance(exc, SystemExit)
            else f"{type(exc).__name__}: {exc}"
        )
        print(f"{who}stopped: {why}. {failure_advice()}", file=sys.stderr, flush=True)
        raise
    processes.finish()
    return status


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
