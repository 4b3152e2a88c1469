"""The distributed step of `python -m course.finetune` under torchrun: processes, batches, losses.

Used by course.finetune when torchrun starts it several times (DistributedDataParallel).
"""

# How N processes (`torchrun --nproc-per-node N`) stay equal to one process with the
# global batch B = N * per-process batch:
#
# - Which examples. PyTorch's DistributedSampler shuffles with a generator seeded from
#   `seed + epoch`, so its order is not notebook 05's DataLoader's, which seeds each
#   epoch's shuffle with a number drawn from PyTorch's global generator. `ShardedBatches`
#   draws the epoch's shuffle as the notebook's loader does, cuts it into global batches
#   and gives each process its slice: step s of all processes together covers exactly the
#   examples of step s of one process with batch B. Evaluations use the same slices.
# - How the loss is averaged. `cross_entropy` with `ignore_index` averages over a
#   batch's counted tokens (targets that are not -100), and each process holds a
#   different number of them. Every process learns the global count C (one all-gather
#   of three numbers a step) and scales its own mean m_r over its c_r tokens to
#   m_r * c_r * N / C; DDP averages the gradients, so the step's gradient is that of
#   sum_r m_r * c_r / C, the mean over all C tokens. Logged losses and evaluations are
#   reduced the same way, and the tokens seen count the global batch padded to its
#   longest row, as one process counts them.
# - Waits. Rank 0 alone makes the split, downloads GPT-2 and writes the results; the
#   others wait for it in the run's store (`Processes.rank_0_first`, `patient_barrier`),
#   outside any collective call, so that a download longer than the process group's
#   timeout (PyTorch's default: 10 minutes for NCCL) does not end the run.

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from course import hardware, speed, training

PATIENCE_SECONDS = 12 * 3600  # how long a process waits for rank 0's download at most


class Processes:
    """This process's place in the run (torchrun's variables): rank 0 of 1 without it."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.store = None  # the run's key-value store, once started
        self._waits = 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> str:
        """Join the process group (NCCL for GPUs, gloo for the CPU); returns the backend."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        # torchrun's store, kept for the waits without a timeout (rank_0_first)
        store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size))
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("default_pg", store),
            rank=self.rank,
            world_size=self.world_size,
            device_id=device if device.type == "cuda" else None,
        )
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"course/{restart}", store)
        return backend

    def rank_0_first(self, what: str, work: Callable[[], Any]) -> Any:
        """`work()` in rank 0, then in the other processes; returns this process's result.

        Rank 0's `work` may download for hours; the others wait for it by polling the
        run's store (no process group timeout applies), at most PATIENCE_SECONDS.
        Then all wait, alike, until every process has done its `work`.
        """
        if not self.several:
            return work()
        self._waits += 1
        name = f"{self._waits}-{what}"
        if self.main:
            result = work()
        self.patient_barrier(f"{name}/rank-0", what)
        if not self.main:
            result = work()
        self.patient_barrier(f"{name}/all", what)
        return result

    def patient_barrier(self, key: str | None = None, what: str = "arrive") -> None:
        """Every process arrives at `key`; return when all have (or fail at the deadline).

        Without a key: the next of the waits all processes take in the same order."""
        if key is None:
            self._waits += 1
            key = f"{self._waits}-wait"
        self.store.add(key, 1)
        deadline = time.monotonic() + PATIENCE_SECONDS
        while self.store.add(key, 0) < self.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Waited {PATIENCE_SECONDS / 3600:.0f} hours for the other processes "
                    f"to {what}: stopped. The same command continues what was saved."
                )
            time.sleep(0.2)

    def finish(self) -> None:
        if self.several:
            dist.destroy_process_group()


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
    comment at the top of this module) and the whole global batch's loss as its
    value, the same number in every process, so that all stop alike at a loss that is
    not finite. `stats["tokens"]` becomes the global batch's tokens, padded to its
    longest row as one process pads them.
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


def sharded_task(model, train_loader, val_loader, device, processes: Processes, eval_iter: int):
    """The fine-tuning Task of `course.training.train_run` on several processes: DDP and
    token-weighted losses. Rank 0 alone shows progress and writes the checkpoint, which
    records the global batch size (another number of processes continues it)."""
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
            losses = [
                sharded_loader_loss(loader, fast_loss, processes, device, eval_iter)
                for loader in (train_loader, val_loader)
            ]
        model.train()
        return tuple(losses)

    return training.fine_tuning_task(
        batch_loss=sharded_step_loss(ddp_model, processes, device, stats),
        batch_tokens=lambda batch: stats["tokens"],
        evaluate_losses=evaluate_losses,
    )
