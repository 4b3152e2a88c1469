"""One measurement of benchmarks/benchmark.py, run in a child process of its own:
training steps (the book's code, the fast paths, LoRA, several processes) or generation,
timed, with the process's peak memory.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from functools import partial

import psutil
import torch

import helpers
from course import speed
from course.data import load_instruction_data
from course.settings import model_config

EOS_ID = 50256
LEARNING_RATE, WEIGHT_DECAY, BATCH_SIZE, SEED = 5e-5, 0.1, 8, 123
LORA_RANK, LORA_ALPHA = 16, 16
PROCESSES = 2  # of the "2 processes" row


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cpu_seconds() -> float:
    """CPU time of this process so far (all its threads, user and system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_model(model_name: str) -> helpers.GPTModel:
    torch.manual_seed(SEED)
    return helpers.GPTModel(model_config(model_name))


def fastest_pass(repeat: int, work):
    """(seconds, CPU seconds, result) of the fastest of `repeat` runs of `work()`: other
    programs only ever slow one down."""
    seconds = cpu = float("inf")
    result = None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        result = work()
        seconds = min(seconds, time.perf_counter() - start)
        cpu = min(cpu, cpu_seconds() - start_cpu)
    return seconds, cpu, result


def training_data():
    """The tokenizer, the train split and the book's collate function (up to 1024 tokens)."""
    tokenizer = helpers.get_tokenizer()
    train_data = helpers.split_data(load_instruction_data())[0]
    return tokenizer, train_data, partial(helpers.custom_collate_fn, allowed_max_length=1024)


def first_batches(loader, count: int) -> list:
    """The first `count` batches of `loader`."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def measure_training(model_name: str, variant: str, steps: int, repeat: int) -> dict:
    """`steps` optimizer steps on the first training batches (after one warm-up step)."""
    from torch.utils.data import DataLoader

    tokenizer, train_data, collate = training_data()
    torch.manual_seed(SEED)
    loader = DataLoader(
        helpers.InstructionDataset(train_data, tokenizer),
        batch_size=BATCH_SIZE,
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
    )
    batches = first_batches(loader, steps + 1)

    model = build_model(model_name)
    book = variant.startswith("book")
    if "LoRA" in variant:  # exercise 7.4: freeze everything, then add the adapters
        for param in model.parameters():
            param.requires_grad = False
        helpers.replace_linear_with_lora(model, LORA_RANK, LORA_ALPHA)
    model.train()
    if book:  # the book: PyTorch's default AdamW and the plain loss
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
        calc_loss_batch = helpers.calc_loss_batch
    else:  # what course.training.train_model does
        speed.keep_freed_memory()
        optimizer = speed.make_optimizer(model, LEARNING_RATE, WEIGHT_DECAY)
        calc_loss_batch = speed.calc_loss_batch_fast
    precision = "bf16" if "bf16" in variant else "fp32"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loaded_mb = rss_mb()

    def train_step(input_batch, target_batch) -> float:
        optimizer.zero_grad()
        with speed.autocast_context("cpu", precision):
            loss = calc_loss_batch(input_batch, target_batch, model, "cpu")
        loss.backward()
        optimizer.step()
        return loss.item()

    first_loss = train_step(*batches[0])  # warm-up (allocates the optimizer state)
    tokens = sum(input_batch.numel() for input_batch, _ in batches[1:])
    seconds, cpu, _ = fastest_pass(repeat, lambda: [train_step(*b) for b in batches[1:]])
    return training_result(tokens, seconds, cpu, first_loss, trainable, loaded_mb, peak_rss_mb())


def measure_processes(model_name: str, steps: int, repeat: int) -> dict | None:
    """The fast fp32 row on the processes of a torchrun run, as course.finetune trains.

    Each process takes its part of the same global batches of 8 (`ShardedBatches`) and
    steps through `course.finetune`'s token-weighted loss under DistributedDataParallel
    (gloo). Rank 0 returns the result (None on the others); the CPU time is all
    processes' together.
    """
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from course import distributed

    processes = distributed.Processes()
    dist.init_process_group("gloo")
    tokenizer, train_data, collate = training_data()
    part_size = BATCH_SIZE // processes.world_size
    torch.manual_seed(SEED)
    sampler = distributed.ShardedBatches(
        len(train_data), part_size, processes.rank, processes.world_size, shuffle=True
    )
    loader = DataLoader(
        helpers.InstructionDataset(train_data, tokenizer), batch_sampler=sampler, collate_fn=collate
    )
    batches = first_batches(loader, steps + 1)

    model = build_model(model_name)
    model.train()
    speed.keep_freed_memory()
    optimizer = speed.make_optimizer(model, LEARNING_RATE, WEIGHT_DECAY)
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        distributed.BatchLoss(model, torch.device("cpu")), broadcast_buffers=False
    )
    stats = {"tokens": 0}
    batch_loss = distributed.sharded_step_loss(ddp_model, processes, "cpu", stats)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loaded_mb = rss_mb()

    def train_step(part) -> float:
        optimizer.zero_grad()
        loss = batch_loss(part)
        loss.backward()
        optimizer.step()
        return loss.item()

    first_loss = train_step(batches[0])  # warm-up (allocates the optimizer state)
    seconds = cpu = float("inf")
    for _ in range(repeat):  # the fastest pass: other programs only ever slow one down
        dist.barrier()
        start, start_cpu = time.perf_counter(), cpu_seconds()
        tokens = 0
        for part in batches[1:]:
            train_step(part)
            tokens += stats["tokens"]  # the global batch's, as one process counts them
        dist.barrier()
        seconds = min(seconds, time.perf_counter() - start)
        used = torch.tensor([cpu_seconds() - start_cpu], dtype=torch.float64)
        dist.all_reduce(used)
        cpu = min(cpu, float(used))
    peak = torch.tensor([peak_rss_mb()], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    if not processes.main:
        return None
    return training_result(tokens, seconds, cpu, first_loss, trainable, loaded_mb, float(peak))


def training_result(
    tokens: int,
    seconds: float,
    cpu: float,
    first_loss: float,
    trainable: int,
    loaded_mb: float,
    peak_mb: float,
) -> dict:
    """What a training measurement reports, as its child process prints it."""
    return {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "first_loss": first_loss,
        "trainable": trainable,
        "loaded_mb": loaded_mb,
        "peak_mb": peak_mb,
    }


def measure_generation(
    model_name: str,
    variant: str,
    n_prompts: int,
    max_new_tokens: int,
    batch_size: int,
    repeat: int,
) -> dict:
    """Greedy responses to the first `n_prompts` test prompts, stopping at <|endoftext|>."""
    tokenizer = helpers.get_tokenizer()
    test_data = helpers.split_data(load_instruction_data())[2][:n_prompts]
    prompts = [tokenizer.encode(helpers.format_input(entry)) for entry in test_data]
    model = build_model(model_name)
    model.eval()
    if not variant.startswith("book"):
        speed.keep_freed_memory()
    if variant == "batched, no oneDNN":  # what oneDNN buys: every product through MKL
        speed._onednn_linear = False
    context_size = model.pos_emb.weight.shape[0]
    loaded_mb = rss_mb()

    def run(some_prompts, n_new):
        if variant in ("cached + batched", "batched, no oneDNN"):
            return speed.generate_batch(
                model, some_prompts, n_new, context_size, eos_id=EOS_ID, batch_size=batch_size
            )
        generate = helpers.generate if variant.startswith("book") else speed.generate_fast
        outputs = []
        for prompt in some_prompts:
            idx = torch.tensor([prompt])
            out = generate(model, idx, n_new, context_size, eos_id=EOS_ID)
            outputs.append(out[0, len(prompt) :].tolist())
        return outputs

    run(prompts[:1], 2)  # warm-up
    seconds, cpu, outputs = fastest_pass(repeat, lambda: run(prompts, max_new_tokens))
    digest = hashlib.sha256(json.dumps(outputs).encode()).hexdigest()
    return {
        "tokens": sum(len(o) for o in outputs),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "digest": digest,
        "loaded_mb": loaded_mb,
        "peak_mb": peak_rss_mb(),
    }
