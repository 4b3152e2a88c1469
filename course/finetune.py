"""Notebook 05's fine-tuning from the command line, in one process or several (torchrun).

    python -m course.finetune --offline                     # the tiny offline model
    python -m course.finetune --model gpt2-small --epochs 1
    python -m course.finetune --dataset alpaca              # exercise 7.3 on one GPU
    torchrun --nproc-per-node 4 -m course.finetune --dataset alpaca --batch-size 2

It runs what notebook 05's cells run, with the same settings (the COURSE_* variables,
or run_course.py's flags, which set them): notebook 01's split, the same data
loaders and collate function, the pretrained weights, the initial losses, LoRA when
asked, the book's AdamW, an evaluation every 5 steps on 5 batches, a sample after
each epoch, and the same resumable checkpoint. It writes the same artifacts,
`<run>-sft.pth` and `<run>-training-log.json`, so notebooks 06-09 and
`python run_course.py --from 06` continue from them. In one process it computes
exactly what the notebook computes: the same bytes in `-sft.pth` on the same machine.

Several processes (`torchrun --nproc-per-node N`, or `python -m torch.distributed.run`
where the `torchrun` script is not on the PATH) train one model together with
PyTorch's DistributedDataParallel (appendix A of the book): one process per GPU with
NCCL, or processes on the CPU with gloo. `--batch-size` is then each process's batch;
the global batch, what one optimizer step learns from, is that times N. How the run
stays equal to one process with the global batch:

- **Which examples.** PyTorch's DistributedSampler shuffles with a generator seeded
  from `seed + epoch` and deals the examples out in turn (rank r takes positions r,
  r + N, ...), so its order is not the order of notebook 05's DataLoader, which seeds
  each epoch's shuffle with a number drawn from PyTorch's global generator: a run on
  several processes would see other batches than the notebook. `ShardedBatches` is
  the sampler used instead: every process draws the epoch's shuffle exactly as the
  notebook's loader does (the same draw from the same seeded generator), cuts it
  into global batches, and takes its own slice of each. With N processes of batch
  B/N, step s of all processes together covers exactly the examples of step s of one
  process with batch B. Evaluations use the same slices of the same batches.
- **How the loss is averaged.** One process's `cross_entropy` with `ignore_index`
  averages over the batch's counted tokens (the targets that are not -100). Each
  process holds a different number of them, so a plain mean of the processes' own
  means would weight a token more when it sits in a process with fewer counted
  tokens. The loss is instead the token-weighted mean: every process learns the
  global count C of counted tokens (one all-gather of three numbers per step) and
  scales its own mean m_r over its c_r tokens to m_r * c_r * N / C. DDP averages the
  N processes' gradients, so the step's gradient is that of sum_r m_r * c_r / C, the
  mean over all C tokens: what one process computes on the whole batch, however the
  tokens fall between the processes. The logged losses are reduced the same way (per
  batch, all processes' summed token losses over their count), and so are the
  evaluations; the tokens seen count the global batch padded to its longest row, as
  one process counts them.
- **Files.** Only rank 0 prints and writes the checkpoint, `-sft.pth` and the
  training log, with the course's atomic writer. The checkpoint records the global
  batch size, not N: a run continues exactly with another number of processes when
  the global batch stays the same (`torchrun --nproc-per-node 2 ... --batch-size 4`
  continues a run of one process with `--batch-size 8`), and stops with a message
  naming both batch sizes when it does not.
- **Failures.** When a process fails or is killed, `torchrun` stops the others and
  names the failed rank; the others say that the last checkpoint is intact (a save
  replaces the whole file at once), and the same command continues from it.

With fp32, N processes give the losses and weights of one process with the global
batch within float rounding (the sums are added in another order), as
tests/test_finetune.py checks with two processes on the CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

import helpers
from course import artifacts, data, hardware, lora, settings, speed, training, weights

EVAL_FREQ, EVAL_ITER = 5, 5  # notebook 05's evaluation schedule (the book's)

# command-line flag -> the COURSE_* variable notebook 05's parameters cell reads:
# run_course.py's flags, less those of the judge and of the evaluated stage
OPTIONS = [
    (flag, name, "batch size of each process (8)" if flag == "--batch-size" else text)
    for flag, name, text in settings.COMMAND_LINE_OPTIONS
    if name not in ("COURSE_JUDGE_MODEL", "COURSE_JUDGE_RUNS", "COURSE_STAGE")
]


# -- the processes of a run ------------------------------------------------------------


class Processes:
    """This process's place in the run (torchrun's variables): rank 0 of 1 without it."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.several:
            dist.barrier()


def choose_device(requested: str, processes: Processes) -> torch.device:
    """Notebook 05's device; with several processes, this process's GPU or the CPU."""
    if not processes.several:
        return hardware.choose_device(requested)
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if processes.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"{processes.world_size} processes on this machine, but it has "
                f"{torch.cuda.device_count()} GPU(s): use --nproc-per-node "
                f"{torch.cuda.device_count()} or fewer (one process per GPU)."
            )
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
        return device
    if requested == "cuda":
        raise RuntimeError("COURSE_DEVICE=cuda, but PyTorch sees no CUDA GPU here.")
    if requested == "mps":
        raise RuntimeError(
            "Several processes need CUDA GPUs (NCCL) or the CPU (gloo); the Apple GPU "
            "(mps) trains in one process: run python -m course.finetune without torchrun."
        )
    return torch.device("cpu")


# -- which examples each process takes --------------------------------------------------


class ShardedBatches(Sampler):
    """This process's part of each of notebook 05's batches (a batch sampler).

    `batch_size` is one process's batch; the global batch is `batch_size *
    world_size`. With `shuffle=True` every epoch is shuffled exactly as notebook 05's
    `DataLoader(shuffle=True)` shuffles it: the seed of the epoch's permutation is
    drawn from PyTorch's global generator as `RandomSampler` draws it, and the last
    incomplete global batch is dropped (`drop_last=True`). Without shuffling the
    batches follow the file and the last one may be incomplete, as in the notebook's
    validation loader; a process's part of it may then be empty (an empty list).

    Every process draws the same seed (they all seed the global generator alike), so
    the processes' parts of step s together are the global batch of step s. With one
    process these are the notebook's batches.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = False
    ) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size

    def __len__(self) -> int:
        if self.shuffle:  # drop_last
            return self.size // self.global_batch
        return -(-self.size // self.global_batch)

    def __iter__(self):
        if self.shuffle:  # RandomSampler's draw, then its permutation
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator()
            generator.manual_seed(seed)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        start = self.rank * self.batch_size
        for step in range(len(self)):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            yield batch[start : start + self.batch_size]


def collate_part(batch: list, collate):
    """`collate(batch)`, or None for a process's empty part of an incomplete batch."""
    return collate(batch) if batch else None


# -- the loss of several processes ------------------------------------------------------


class BatchLoss(torch.nn.Module):
    """The model as DistributedDataParallel wraps it: forward gives a batch's mean loss.

    DDP synchronizes the gradients of the parameters its forward call used; the
    forward here is the fast loss `course.training.train_model` trains with
    (`course.speed.calc_loss_batch_fast`).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.device = model, device

    def forward(self, input_batch, target_batch):
        return speed.calc_loss_batch_fast(input_batch, target_batch, self.model, self.device)


def gather_counts(part, processes: Processes, device) -> torch.Tensor:
    """Per process, [counted targets, rows, row length] of its part of the batch."""
    if part is None:
        mine = torch.zeros(3, dtype=torch.int64, device=device)
    else:
        inputs, targets = part
        counted = int((targets != -100).sum())
        mine = torch.tensor([counted, *inputs.shape], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(processes.world_size)]
    dist.all_gather(everyone, mine)
    return torch.stack(everyone).cpu()


def sharded_step_loss(ddp_model, processes: Processes, device, stats: dict):
    """batch -> one training step's loss, token-weighted across the processes.

    The tensor returned has this process's share of the loss as its gradient (see the
    module's docstring) and the whole global batch's loss as its value, the same
    number in every process, so that all stop alike at a loss that is not finite.
    `stats["tokens"]` becomes the global batch's tokens, padded to its longest row as
    one process pads them.
    """

    def batch_loss(part):
        counts = gather_counts(part, processes, device)
        counted = int(counts[:, 0].sum())
        stats["tokens"] = int(counts[:, 1].sum()) * int(counts[:, 2].max())
        mine = int(counts[processes.rank, 0])
        share = ddp_model(*part) * (mine * processes.world_size / counted)
        total = share.detach().clone()
        dist.all_reduce(total)
        # the value of the global loss, the gradient of this process's share
        return share + (total / processes.world_size - share).detach()

    return batch_loss


def sharded_loader_loss(loader, batch_loss, processes: Processes, device, num_batches=None):
    """`helpers.calc_loss_loader` over the processes' parts of each batch.

    Each batch's loss is the token-weighted mean over all processes' parts (their
    summed token losses over their count), and the result is the mean of the first
    `num_batches` batches' losses, as one process computes it. `batch_loss(part)` is
    one process's mean loss over its part.
    """
    if len(loader) == 0:
        return float("nan")
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    total = 0.0
    for i, part in enumerate(loader):
        if i >= num_batches:
            break
        counted = 0 if part is None else int((part[1] != -100).sum())
        loss = batch_loss(part).item() if counted else 0.0
        summed = torch.tensor([loss * counted, counted], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        total += float(summed[0] / summed[1])
    return total / num_batches


def train_sharded(model, train_loader, val_loader, optimizer, device, processes, **kwargs) -> dict:
    """`course.training.train_model` on several processes: DDP, token-weighted losses."""
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        BatchLoss(model, device),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,  # the model's buffers (the causal mask) never change
    )
    stats = {"tokens": 0}

    def fast_loss(part):
        return speed.calc_loss_batch_fast(*part, model, device)

    def evaluate_losses():
        model.eval()
        with torch.no_grad():
            train_loss = sharded_loader_loss(train_loader, fast_loss, processes, device, EVAL_ITER)
            val_loss = sharded_loader_loss(val_loader, fast_loss, processes, device, EVAL_ITER)
        model.train()
        return train_loss, val_loss

    task = training.fine_tuning_task(
        batch_loss=sharded_step_loss(ddp_model, processes, device, stats),
        batch_tokens=lambda batch: stats["tokens"],
        evaluate_losses=evaluate_losses,
    )
    return training.run_resumable(
        task,
        model,
        train_loader,
        optimizer,
        device,
        save_checkpoints=processes.main,
        show_progress=processes.main,
        **kwargs,
    )


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
    for flag, name, text in OPTIONS:
        parser.add_argument(flag, help=f"{text}; sets {name}")
    parser.add_argument(
        "--offline", action="store_true", help="the offline model (= --model offline)"
    )
    parser.add_argument(
        "--mask-instructions",
        action="store_true",
        help="exercise 7.2; sets COURSE_MASK_INSTRUCTIONS",
    )
    parser.add_argument(
        "--artifacts",
        help="folder for the artifacts, from the current folder; sets COURSE_ARTIFACTS",
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
    if args.offline and args.model not in (None, "offline"):
        parser.error(f"--offline and --model {args.model} contradict each other: choose one.")
    for name in ("checkpoint_every", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if not args.checkpoint_minutes > 0:
        parser.error("--checkpoint-minutes must be above 0.")
    return args


def apply_flags(args: argparse.Namespace) -> None:
    """Set the COURSE_* variables the flags name, as run_course.py does."""
    for flag, name, _ in OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            os.environ[name] = str(value)
    if args.offline:
        os.environ["COURSE_MODEL"] = "offline"
    if args.mask_instructions:
        os.environ["COURSE_MASK_INSTRUCTIONS"] = "true"
    if args.retrain:
        os.environ["COURSE_RETRAIN"] = "true"
    if args.models_dir is not None:  # a path on the command line counts from here
        os.environ["COURSE_MODELS_DIR"] = str(Path(args.models_dir).expanduser().resolve())
    if args.artifacts is not None:
        os.environ["COURSE_ARTIFACTS"] = str(Path(args.artifacts).expanduser().resolve())
    dataset = os.environ.get("COURSE_DATASET", "").strip()
    if dataset and dataset not in ("book", "alpaca") and "://" not in dataset:
        if Path(dataset).exists():
            os.environ["COURSE_DATASET"] = str(Path(dataset).resolve())


def read_settings() -> dict:
    """Notebook 05's parameters cell."""
    setting = settings.setting
    return {
        "CHOOSE_MODEL": setting("COURSE_MODEL", "gpt2-medium (355M)"),
        "PROMPT_STYLE": setting("COURSE_PROMPT_STYLE", "alpaca"),
        "MASK_INSTRUCTIONS": setting("COURSE_MASK_INSTRUCTIONS", False),
        "DATASET": setting("COURSE_DATASET", "book"),
        "DATA_LIMIT": setting("COURSE_DATA_LIMIT", 0),
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


def ensure_split(processes: Processes) -> None:
    """Notebook 01's split of the data; rank 0 makes it as notebook 01 does when missing."""
    path = artifacts.split_path()
    if processes.main and not path.exists():
        print(
            f"No split {path.name} in {path.parent} yet (notebook "
            f"{artifacts.WRITTEN_BY['split']} makes it): making it as that notebook does."
        )
        split = data.save_split(data.load_course_data())
        print("Saved", path.name, "with", {k: len(split[k]) for k in ("train", "val", "test")})
    processes.barrier()


def load_pretrained(model_name: str, models_dir: str, processes: Processes):
    """Notebook 05's pretrained model; rank 0 downloads it first, the others then read it."""
    size = settings.model_size(model_name)
    if processes.main:
        _, params = weights.load_gpt2(size, models_dir)
    processes.barrier()
    if not processes.main:
        _, params = weights.load_gpt2(size, models_dir)
    model = helpers.GPTModel(settings.model_config(model_name))
    weights.load_weights_into_gpt(model, params)
    return model


def run(args: argparse.Namespace, processes: Processes) -> int:
    """Notebook 05's cells, in order."""
    p = read_settings()
    model_name = settings.resolve_model_name(p["CHOOSE_MODEL"])
    dataset_tag = settings.dataset_tag(p["DATASET"], p["DATA_LIMIT"])
    stem = artifacts.run_stem(
        model_name, dataset_tag, p["FINETUNE"], p["PROMPT_STYLE"], p["MASK_INSTRUCTIONS"]
    )
    world = processes.world_size
    global_batch = p["BATCH_SIZE"] * world

    # 1. device and precision
    device = choose_device(p["DEVICE"], processes)
    print("Device:", device)
    precision = speed.choose_precision(device, p["PRECISION"])
    if processes.several:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        print(
            f"{world} processes ({backend}): batch {p['BATCH_SIZE']} per process, "
            f"global batch {global_batch}"
        )

    # 2. the data loaders
    ensure_split(processes)
    train_data, val_data, test_data = data.load_split()
    tokenizer = helpers.get_tokenizer()
    collate = partial(
        helpers.custom_collate_fn,
        device=device,
        allowed_max_length=1024,
        mask_instructions=p["MASK_INSTRUCTIONS"],
    )

    def make_loader(entries, shuffle):
        dataset = helpers.InstructionDataset(
            entries, tokenizer, style=p["PROMPT_STYLE"], with_prompt_length=p["MASK_INSTRUCTIONS"]
        )
        batches = ShardedBatches(len(dataset), p["BATCH_SIZE"], processes.rank, world, shuffle)
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=partial(collate_part, collate=collate),
            num_workers=0,
        )

    torch.manual_seed(p["SEED"])
    train_loader = make_loader(train_data, shuffle=True)
    val_loader = make_loader(val_data, shuffle=False)
    test_loader = make_loader(test_data, shuffle=False)
    print(f"Entries: train {len(train_data)}, validation {len(val_data)}, test {len(test_data)}")
    print(
        f"Batches per epoch: train {len(train_loader)}, validation {len(val_loader)}, "
        f"test {len(test_loader)}"
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"The training set has {len(train_data)} entries, fewer than one global batch "
            f"of {global_batch}: use a smaller --batch-size or more data."
        )

    # 3. the pretrained model
    model = load_pretrained(model_name, p["MODELS_DIR"], processes)
    model.to(device)
    print(f"Loaded {model_name} on {device}")

    # 4. the losses before fine-tuning (the book's calc_loss_loader)
    model.eval()
    torch.manual_seed(p["SEED"])
    with torch.no_grad():
        if processes.several:

            def book_loss(part):
                return helpers.calc_loss_batch(*part, model, device)

            train_loss = sharded_loader_loss(train_loader, book_loss, processes, device, 5)
            val_loss = sharded_loader_loss(val_loader, book_loss, processes, device, 5)
        else:
            train_loss = helpers.calc_loss_loader(train_loader, model, device, num_batches=5)
            val_loss = helpers.calc_loss_loader(val_loader, model, device, num_batches=5)
    initial_losses = {"train": train_loss, "val": val_loss}
    print("Training loss:", train_loss)
    print("Validation loss:", val_loss)
    training.check_initial_loss(val_loss, model_name)

    # 5. full fine-tuning or LoRA
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

    # 6. the book's training loop, resumable
    checkpoint_path = artifacts.path_for("checkpoint", stem)
    run_config = training.run_config(
        model_name,
        dataset_tag,
        train_data,
        prompt_style=p["PROMPT_STYLE"],
        mask_instructions=p["MASK_INSTRUCTIONS"],
        data_limit=p["DATA_LIMIT"],
        finetune=p["FINETUNE"],
        lora_rank=p["LORA_RANK"],
        lora_alpha=p["LORA_ALPHA"],
        batch_size=global_batch,  # what one step learns from, whatever the processes
        seed=p["SEED"],
    )
    torch.manual_seed(p["SEED"])
    optimizer = speed.make_optimizer(model, lr=p["LEARNING_RATE"], weight_decay=p["WEIGHT_DECAY"])
    loop = dict(
        num_epochs=p["NUM_EPOCHS"],
        eval_freq=EVAL_FREQ,
        eval_iter=EVAL_ITER,
        start_context=helpers.format_input(val_data[0], p["PROMPT_STYLE"]),
        tokenizer=tokenizer,
        checkpoint_path=checkpoint_path,
        precision=precision,
        run_config=run_config,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        force=p["RETRAIN"],
        max_steps=args.max_steps,
    )
    if processes.several:
        history = train_sharded(
            model, train_loader, val_loader, optimizer, device, processes, **loop
        )
    else:
        history = training.train_model(model, train_loader, val_loader, optimizer, device, **loop)
    train_losses, val_losses, tokens_seen = (
        history["train_losses"],
        history["val_losses"],
        history["tokens_seen"],
    )
    where = f"{world} processes on {device.type}" if processes.several else str(device)
    print(f"Training took {history['train_seconds'] / 60:.2f} minutes on {where} ({precision}).")
    if model_name == settings.OFFLINE_MODEL:
        print(
            "This is the offline model: tiny, with random weights. Its losses fall, but its "
            "samples stay noise; they only show that the code runs."
        )
    if not history["finished"]:
        print("Training has not finished: the same command continues it.")
        return 0
    steps_per_epoch = len(train_loader)
    print(
        f"{p['NUM_EPOCHS']} epochs of {steps_per_epoch} steps: "
        f"{history['global_step'] + 1} steps in all"
    )
    print(
        f"{len(train_losses)} evaluations, at steps {history['eval_steps'][:3]} ... "
        f"{history['eval_steps'][-1]}"
    )
    print(f"Tokens seen: {tokens_seen[-1]:,} at the last evaluation")

    # 7. the fine-tuned model and the training log: rank 0 alone writes them
    if processes.main:
        sft_path = artifacts.path_for("sft", stem)
        if p["FINETUNE"] == "lora":
            weights_to_save = lora.merged_state_dict(model)  # a plain GPTModel state_dict
        else:
            weights_to_save = model.state_dict()
        artifacts.torch_save(weights_to_save, sft_path)
        training_log = training.training_log(
            history,
            initial_losses,
            run_config,
            model=model,
            device=device,
            precision=precision,
            learning_rate=p["LEARNING_RATE"],
            weight_decay=p["WEIGHT_DECAY"],
            num_epochs=p["NUM_EPOCHS"],
            eval_freq=EVAL_FREQ,
            eval_iter=EVAL_ITER,
            steps_per_epoch=steps_per_epoch,
        )
        training_log["config"].update(processes=world, per_process_batch_size=p["BATCH_SIZE"])
        log_path = artifacts.write_training_log(stem, training_log)
        size_mb = sft_path.stat().st_size / 1e6
        print(f"Saved {sft_path.name} ({size_mb:.0f} MB) and {log_path.name}")
        print(f"Final losses: train {train_losses[-1]:.3f}, validation {val_losses[-1]:.3f}")
        print("Next: notebook 06, or python run_course.py --from 06 with the same settings.")
    processes.barrier()
    return 0


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
    return "No checkpoint was saved yet: the same command starts anew."


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
    except KeyboardInterrupt:
        if processes.several:
            print(f"{who}stopped by Ctrl+C. {failure_advice()}", file=sys.stderr, flush=True)
        return 130  # (the training loop has said where it stopped)
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
    if processes.several:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
