"""Fine-tuning and generation speed: the book's plain code against the course's fast paths.

Every row runs the same `helpers.GPTModel` (the book's model, random weights of a
GPT-2 size: speed does not depend on the weights' values) on the course's real data
(training batches from the train split of instruction-data.json, prompts from its
test split formatted with format_input):

- "book" rows: the book's code as it is: `helpers.calc_loss_batch` and
  `torch.optim.AdamW(model.parameters())` for fine-tuning, `helpers.generate` one
  prompt at a time for generation.
- "fast" rows: `course.speed` on that same model, as `course.training.train_model`
  and notebook 07 run it: `calc_loss_batch_fast`, the fused AdamW of
  `make_optimizer`, bf16 autocast where the row says so, `generate_fast` (key/value
  cache) and `generate_batch` (cache and batches; the few-row matrix products of each
  step through oneDNN, `course.speed.linear`), after `keep_freed_memory()`.
- "LoRA" rows: the fast fp32 row with the pretrained weights frozen and
  `helpers.replace_linear_with_lora(model, rank=16, alpha=16)` (exercise 7.4).
- the "2 processes" row: the fast fp32 row's steps on two CPU processes under
  `torchrun` (DistributedDataParallel with gloo, batch 4 each, the global batch 8),
  as `course.finetune` runs them; its ratio to the fast fp32 row is the overhead of
  several processes on one CPU (no speed-up is expected on a two-core machine).

Each row runs in a fresh Python process of its own with the default thread count,
so that its peak memory (peak resident set size) is its own. The speed-ups compare
rows of the same run; the checks at the end are the course's claims.

    python benchmarks/benchmark.py                      # gpt2-small and gpt2-medium
    python benchmarks/benchmark.py --models gpt2-small --train-steps 2 --gen-prompts 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402
from course import speed  # noqa: E402
from course.artifacts import write_atomic  # noqa: E402
from course.data import load_instruction_data  # noqa: E402
from course.settings import model_config, resolve_model_name  # noqa: E402

EOS_ID = 50256
LEARNING_RATE, WEIGHT_DECAY, BATCH_SIZE, SEED = 5e-5, 0.1, 8, 123
LORA_RANK, LORA_ALPHA = 16, 16

TRAIN_ROWS = ["book fp32", "fast fp32", "fast bf16", "fast fp32 LoRA r16", "fast fp32 2 processes"]
PROCESSES = 2  # of the "2 processes" row
GENERATION_ROWS = ["book generate", "cached", "cached + batched", "batched, no oneDNN"]
# the course's claims: (row, the speed-up over the book's row it must reach at least)
CLAIMS = [("fast fp32", 1.4), ("fast bf16", 3.0), ("cached + batched", 20.0)]


# ---------------------------------------------------------------------------
# one measurement (runs in a child process)
# ---------------------------------------------------------------------------


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


def measure_training(model_name: str, variant: str, steps: int, repeat: int) -> dict:
    """`steps` optimizer steps on the first training batches (after one warm-up step)."""
    from functools import partial

    from torch.utils.data import DataLoader

    tokenizer = helpers.get_tokenizer()
    train_data = helpers.split_data(load_instruction_data())[0]
    collate = partial(helpers.custom_collate_fn, allowed_max_length=1024)
    torch.manual_seed(SEED)
    loader = DataLoader(
        helpers.InstructionDataset(train_data, tokenizer),
        batch_size=BATCH_SIZE,
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
    )
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps + 1:
            break

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
    seconds = cpu = float("inf")
    for _ in range(repeat):  # the fastest pass: other programs only ever slow one down
        start, start_cpu = time.perf_counter(), cpu_seconds()
        for input_batch, target_batch in batches[1:]:
            train_step(input_batch, target_batch)
        seconds = min(seconds, time.perf_counter() - start)
        cpu = min(cpu, cpu_seconds() - start_cpu)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "first_loss": first_loss,
        "trainable": trainable,
        "loaded_mb": loaded_mb,
        "peak_mb": peak_rss_mb(),
    }


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
    tokenizer = helpers.get_tokenizer()
    train_data = helpers.split_data(load_instruction_data())[0]
    collate = partial(helpers.custom_collate_fn, allowed_max_length=1024)
    part_size = BATCH_SIZE // processes.world_size
    torch.manual_seed(SEED)
    sampler = distributed.ShardedBatches(
        len(train_data), part_size, processes.rank, processes.world_size, shuffle=True
    )
    loader = DataLoader(
        helpers.InstructionDataset(train_data, tokenizer), batch_sampler=sampler, collate_fn=collate
    )
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps + 1:
            break

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
    return {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "first_loss": first_loss,
        "trainable": trainable,
        "loaded_mb": loaded_mb,
        "peak_mb": float(peak),
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
    seconds = cpu = float("inf")
    for _ in range(repeat):  # the fastest pass: other programs only ever slow one down
        start, start_cpu = time.perf_counter(), cpu_seconds()
        outputs = run(prompts, max_new_tokens)
        seconds = min(seconds, time.perf_counter() - start)
        cpu = min(cpu, cpu_seconds() - start_cpu)
    digest = hashlib.sha256(json.dumps(outputs).encode()).hexdigest()
    return {
        "tokens": sum(len(o) for o in outputs),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "digest": digest,
        "loaded_mb": loaded_mb,
        "peak_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------------------
# the table (parent process)
# ---------------------------------------------------------------------------


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def cpu_has_bf16() -> bool:
    """bf16 instructions (AVX512_BF16 or AMX) that make bf16 autocast worth it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    try:  # other systems: ask oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def run_child(job: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    if job.get("variant", "").endswith("processes"):  # torchrun, as python -m (not on PATH)
        launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={PROCESSES}"]
        cmd = [sys.executable, *launcher, *cmd[1:]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2-small,gpt2-medium", help="comma-separated")
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps (+1 warm-up)")
    parser.add_argument("--gen-prompts", type=int, default=8, help="test prompts to answer")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="for generate_batch")
    parser.add_argument("--repeat", type=int, default=1, help="time N passes, keep the fastest")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument(
        "--skip", default="", help="comma-separated: train, generate, lora, processes"
    )
    parser.add_argument("--output", default=None, help="also write the report here (Markdown)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one measurement, printed as JSON
        job = json.loads(args.child)
        if job["task"] == "train" and job["variant"].endswith("processes"):
            result = measure_processes(job["model"], job["steps"], job["repeat"])
            if result is None:  # not rank 0
                return 0
        elif job["task"] == "train":
            result = measure_training(job["model"], job["variant"], job["steps"], job["repeat"])
        else:
            result = measure_generation(
                job["model"],
                job["variant"],
                job["prompts"],
                job["max_new"],
                job["batch"],
                job["repeat"],
            )
        print(json.dumps(result))
        return 0

    bf16 = cpu_has_bf16() if args.bf16 == "auto" else args.bf16 == "yes"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    machine = (
        f"{cpu_description()}, {os.cpu_count()} cores ({torch.get_num_threads()} threads, "
        f"PyTorch's default), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 instructions: "
        f"{'yes' if cpu_has_bf16() else 'no'}"
    )
    settings = (
        f"Settings: {args.train_steps} timed training steps of batch {BATCH_SIZE} "
        f"(after one warm-up step); {args.gen_prompts} test prompts x up to "
        f"{args.max_new_tokens} new tokens (greedy, stopping at <|endoftext|>), "
        f"generate_batch batch size {args.batch_size}; the fastest of {args.repeat} "
        "timed pass(es) of each."
    )
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Machine: {machine}\n{settings}\n", flush=True)

    rows = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model_name = resolve_model_name(model_name)
        if "train" not in skip:
            variants = [
                v
                for v in TRAIN_ROWS
                if (bf16 or "bf16" not in v)
                and ("lora" not in skip or "LoRA" not in v)
                and ("processes" not in skip or not v.endswith("processes"))
            ]
            base = None
            for variant in variants:
                job = {"task": "train", "model": model_name, "variant": variant}
                r = run_child({**job, "steps": args.train_steps, "repeat": args.repeat})
                base = base or r
                # bf16 computes the same function less precisely; LoRA starts as a no-op
                tolerance = 0.02 * abs(base["first_loss"]) if "bf16" in variant else 1e-4
                same = abs(r["first_loss"] - base["first_loss"]) <= tolerance
                rows.append(table_row(model_name, "fine-tuning", variant, r, base, same))
                print(format_row(rows[-1]), flush=True)
        if "generate" not in skip:
            base = None
            for variant in GENERATION_ROWS:
                job = {"task": "generate", "model": model_name, "variant": variant}
                job.update(prompts=args.gen_prompts, max_new=args.max_new_tokens)
                r = run_child({**job, "batch": args.batch_size, "repeat": args.repeat})
                base = base or r
                same = r["digest"] == base["digest"]
                rows.append(table_row(model_name, "generation", variant, r, base, same))
                print(format_row(rows[-1]), flush=True)

    checks, ok = claim_checks(rows)
    lora = lora_lines(rows) + process_lines(rows)
    options = [a for a in sys.argv[1:] if not a.startswith("--output")]
    if args.output and args.output in options:  # "--output PATH": leave the path out
        options.remove(args.output)
    command = "python benchmarks/benchmark.py " + " ".join(options)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    load = (
        f"Load average (1 min) of the machine: {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end (other programs share the cores; CPU time counts "
        "only this benchmark's own work)."
    )
    report = (
        f"Machine: {machine}\n\n{settings}\n\n{load}\n\nCommand: `{command.strip()}`\n\n"
        f"{markdown_table(rows)}\n\n{lora}{checks}\n"
    )
    print("\n" + report)
    if args.output:
        write_atomic(args.output, report.encode("utf-8"))
    return 0 if ok else 1


def table_row(model, task, variant, r, base, same) -> dict:
    speed_now = r["tokens"] / r["seconds"]
    base_speed = base["tokens"] / base["seconds"]
    cpu_speed = r["tokens"] / r["cpu_seconds"]
    base_cpu_speed = base["tokens"] / base["cpu_seconds"]
    return {
        "model": model,
        "task": task,
        "variant": variant,
        "tokens": r["tokens"],
        "seconds": round(r["seconds"], 2),
        "tokens_per_s": round(speed_now, 1),
        "speedup": round(speed_now / base_speed, 2),
        "tokens_per_cpu_s": round(cpu_speed, 1),
        "cpu_speedup": round(cpu_speed / base_cpu_speed, 2),
        "peak_rss_mb": round(r["peak_mb"]),
        "above_model_mb": round(r["peak_mb"] - r["loaded_mb"]),
        "trainable": r.get("trainable"),
        "same_as_plain": same,
    }


def claim_checks(rows: list[dict]) -> tuple[str, bool]:
    """Each claim of the course against this run: the row's speed-up over the book's."""
    lines, ok = [], True
    for row in rows:
        for variant, minimum in CLAIMS:
            if row["variant"] == variant:
                passed = row["speedup"] >= minimum and row["same_as_plain"]
                ok &= passed
                lines.append(
                    f"- {row['model']}, {row['task']} {variant}: {row['speedup']:.2f}x the "
                    f"book's code (claim: at least {minimum:g}x, same result): "
                    + ("holds" if passed else "FALLS SHORT")
                )
    return "Claims checked in this run:\n\n" + "\n".join(lines) + "\n", ok


def lora_lines(rows: list[dict]) -> str:
    """LoRA against full fine-tuning, both on the fast fp32 path of the same run."""
    lines = []
    for lora in (r for r in rows if "LoRA" in r["variant"]):
        full = next(r for r in rows if r["model"] == lora["model"] and r["variant"] == "fast fp32")
        lines.append(
            f"- {lora['model']}: LoRA trains {lora['trainable']:,} of the parameters "
            f"(full fine-tuning {full['trainable']:,}); "
            f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}x the tokens/s of full "
            f"fine-tuning, peak RSS {lora['peak_rss_mb']} MB against {full['peak_rss_mb']} MB "
            f"({lora['peak_rss_mb'] - full['peak_rss_mb']:+d} MB)"
        )
    if not lines:
        return ""
    return "LoRA (rank 16, alpha 16) against full fine-tuning, both fast fp32:\n\n" + (
        "\n".join(lines) + "\n\n"
    )


def process_lines(rows: list[dict]) -> str:
    """Two processes against one, both fast fp32 with the global batch 8, in this run."""
    lines = []
    for several in (r for r in rows if r["variant"].endswith("processes")):
        one = next(
            r for r in rows if r["model"] == several["model"] and r["variant"] == "fast fp32"
        )
        lines.append(
            f"- {several['model']}: {PROCESSES} processes (batch {BATCH_SIZE // PROCESSES} "
            f"each) take {one['tokens_per_s'] / several['tokens_per_s']:.2f}x the time of one "
            f"process with batch {BATCH_SIZE} for the same steps "
            f"({several['tokens_per_s']:.1f} against {one['tokens_per_s']:.1f} tokens/s; in "
            f"CPU time {one['tokens_per_cpu_s'] / several['tokens_per_cpu_s']:.2f}x)"
        )
    if not lines:
        return ""
    return (
        "Several processes on the CPU (torchrun, DistributedDataParallel with gloo) against "
        "one, both fast fp32:\n\n" + "\n".join(lines) + "\n\n"
    )


def format_row(row: dict) -> str:
    return (
        f"{row['model']:<20} {row['task']:<12} {row['variant']:<19} "
        f"{row['tokens_per_s']:>9.1f} tok/s  x{row['speedup']:<6.2f} "
        f"(CPU time: {row['tokens_per_cpu_s']:.1f} tok/CPU-s x{row['cpu_speedup']:.2f})  "
        f"peak {row['peak_rss_mb']:>6} MB (+{row['above_model_mb']} MB over the model)  "
        f"same: {'yes' if row['same_as_plain'] else 'NO'}"
    )


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | task | row | tokens/s | speed-up over the book's code "
        "| tokens per CPU second | speed-up in CPU time | peak RSS (MB) "
        "| above loaded model (MB) | same result as the book's code |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['task']} | {row['variant']} | {row['tokens_per_s']:.1f} "
            f"| {row['speedup']:.2f}x | {row['tokens_per_cpu_s']:.1f} | {row['cpu_speedup']:.2f}x "
            f"| {row['peak_rss_mb']} | {row['above_model_mb']} "
            f"| {'yes' if row['same_as_plain'] else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
