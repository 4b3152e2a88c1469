"""Fine-tuning and generation speed: the book's plain algorithm against the fast paths.

Runs on the course's real data (instruction-data.json: training batches from the
train split, prompts from the test split formatted with format_input) with GPT-2
sized models holding random weights (speed does not depend on the weights' values).
Every configuration runs in a fresh Python process of its own, so that its peak
memory (peak resident set size) is its own. It prints a table; it asserts nothing.

    python benchmarks/benchmark.py                      # gpt2-small and gpt2-medium
    python benchmarks/benchmark.py --models gpt2-small --train-steps 2 --gen-prompts 4

Columns: tokens/s (fine-tuning: input tokens per second of training steps, padding
included, as the book counts tokens seen; generation: new tokens per second), the
speed-up over the plain algorithm in the same run, the peak RSS of the process and
how much of it came on top of the loaded model (and optimizer), and whether the
result equals the plain algorithm's (generation: the same tokens; fine-tuning: the
first step's loss within 1e-4; bf16 is compared within 2%).

On Linux one more fine-tuning row repeats the last one with two glibc environment
variables (KEEP_FREED_MEMORY below) that keep freed memory for reuse instead of
returning it to the system: the same computation with fewer page faults.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

EOS_ID = 50256
LEARNING_RATE, WEIGHT_DECAY, BATCH_SIZE, SEED = 5e-5, 0.1, 8, 123


# ---------------------------------------------------------------------------
# one measurement (runs in a child process)
# ---------------------------------------------------------------------------


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def load_data() -> list[dict]:
    return helpers.download_and_load_file(ROOT / "instruction-data.json", helpers.DATA_URL)


def build_model(model_name: str, fast: bool) -> helpers.GPTModel:
    torch.manual_seed(SEED)
    return helpers.GPTModel({**helpers.model_config(model_name), "fast": fast})


def measure_training(model_name: str, variant: str, steps: int, repeat: int) -> dict:
    """`steps` optimizer steps on the first training batches (after one warm-up step)."""
    from functools import partial

    from torch.utils.data import DataLoader

    tokenizer = helpers.get_tokenizer()
    train_data = helpers.split_data(load_data())[0]
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

    model = build_model(model_name, fast=variant != "plain fp32")
    model.train()
    if variant == "plain fp32":  # the book: PyTorch's default AdamW
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
    else:
        optimizer = helpers.make_optimizer(model, LEARNING_RATE, WEIGHT_DECAY)
    use_bf16 = "bf16" in variant
    loaded_mb = rss_mb()

    def train_step(input_batch, target_batch) -> float:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = helpers.calc_loss_batch(input_batch, target_batch, model, "cpu")
        loss.backward()
        optimizer.step()
        return loss.item()

    first_loss = train_step(*batches[0])  # warm-up (allocates the optimizer state)
    tokens = sum(input_batch.numel() for input_batch, _ in batches[1:])
    seconds = float("inf")
    for _ in range(repeat):  # the fastest pass: other programs only ever slow one down
        start = time.perf_counter()
        for input_batch, target_batch in batches[1:]:
            train_step(input_batch, target_batch)
        seconds = min(seconds, time.perf_counter() - start)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "first_loss": first_loss,
        "loaded_mb": loaded_mb,
        "peak_mb": peak_rss_mb(),
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
    test_data = helpers.split_data(load_data())[2][:n_prompts]
    prompts = [tokenizer.encode(helpers.format_input(entry)) for entry in test_data]
    model = build_model(model_name, fast=variant != "plain")
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    loaded_mb = rss_mb()

    def run(some_prompts, n_new):
        if variant == "cached + batched":
            return helpers.generate_batch(
                model, some_prompts, n_new, context_size, eos_id=EOS_ID, batch_size=batch_size
            )
        generate = helpers.generate if variant == "plain" else helpers.generate_fast
        outputs = []
        for prompt in some_prompts:
            idx = torch.tensor([prompt])
            out = generate(model, idx, n_new, context_size, eos_id=EOS_ID)
            outputs.append(out[0, len(prompt) :].tolist())
        return outputs

    run(prompts[:1], 2)  # warm-up
    seconds = float("inf")
    for _ in range(repeat):  # the fastest pass: other programs only ever slow one down
        start = time.perf_counter()
        outputs = run(prompts, max_new_tokens)
        seconds = min(seconds, time.perf_counter() - start)
    digest = hashlib.sha256(json.dumps(outputs).encode()).hexdigest()
    return {
        "tokens": sum(len(o) for o in outputs),
        "seconds": seconds,
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


# glibc's malloc hands big freed blocks back to the system, and PyTorch allocates
# them anew at every training step (gradients, bf16 copies of the weights, logits):
# each new page then costs a page fault. These two settings keep freed memory for reuse.
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
}
MALLOC_SUFFIX = " + malloc env"


def run_child(job: dict, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if job["variant"].endswith(MALLOC_SUFFIX):
        env.update(KEEP_FREED_MEMORY)
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2-small,gpt2-medium", help="comma-separated")
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps (+1 warm-up)")
    parser.add_argument("--gen-prompts", type=int, default=8, help="test prompts to answer")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="for generate_batch")
    parser.add_argument("--repeat", type=int, default=1, help="time N passes, keep the fastest")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS")
    parser.add_argument(
        "--skip", default="", help="comma-separated: train, generate, malloc (the malloc env row)"
    )
    parser.add_argument("--output", default=None, help="also write the table here (Markdown)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one measurement, printed as JSON
        job = json.loads(args.child)
        if job["task"] == "train":
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
        return

    bf16 = cpu_has_bf16() if args.bf16 == "auto" else args.bf16 == "yes"
    threads = args.threads or torch.get_num_threads()
    machine = (
        f"{cpu_description()}, {os.cpu_count()} cores ({threads} threads used), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python "
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
    print(f"Machine: {machine}\n{settings}\n", flush=True)

    rows = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model_name = helpers.resolve_model_name(model_name)
        if "train" not in args.skip:
            variants = ["plain fp32", "fast fp32"] + (["fast bf16"] if bf16 else [])
            if sys.platform == "linux" and "malloc" not in args.skip:
                variants.append(variants[-1] + MALLOC_SUFFIX)
            base = None
            for variant in variants:
                job = {"task": "train", "model": model_name, "variant": variant}
                job["repeat"] = args.repeat
                r = run_child({**job, "steps": args.train_steps}, args.threads)
                base = base or r
                tolerance = 0.02 * abs(base["first_loss"]) if "bf16" in variant else 1e-4
                same = abs(r["first_loss"] - base["first_loss"]) <= tolerance
                rows.append(table_row(model_name, "fine-tuning", variant, r, base, same))
                print(format_row(rows[-1]), flush=True)
        if "generate" not in args.skip:
            base = None
            for variant in ["plain", "cached", "cached + batched"]:
                job = {"task": "generate", "model": model_name, "variant": variant}
                job["repeat"] = args.repeat
                job.update(prompts=args.gen_prompts, max_new=args.max_new_tokens)
                r = run_child({**job, "batch": args.batch_size}, args.threads)
                base = base or r
                same = r["digest"] == base["digest"]
                rows.append(table_row(model_name, "generation", variant, r, base, same))
                print(format_row(rows[-1]), flush=True)

    options = [a for a in sys.argv[1:] if not a.startswith("--output")]
    if args.output and args.output in options:  # "--output PATH": leave the path out
        options.remove(args.output)
    command = "python benchmarks/benchmark.py " + " ".join(options)
    report = (
        f"Machine: {machine}\n\n{settings}\n\nCommand: `{command.strip()}`\n\n"
        f"{markdown_table(rows)}\n"
    )
    print("\n" + report)
    if args.output:
        helpers.write_atomic(args.output, ("# Benchmark results\n\n" + report).encode("utf-8"))


def table_row(model, task, variant, r, base, same) -> dict:
    speed = r["tokens"] / r["seconds"]
    base_speed = base["tokens"] / base["seconds"]
    return {
        "model": model,
        "task": task,
        "variant": variant,
        "tokens": r["tokens"],
        "seconds": round(r["seconds"], 2),
        "tokens_per_s": round(speed, 1),
        "speedup": round(speed / base_speed, 2),
        "peak_rss_mb": round(r["peak_mb"]),
        "above_model_mb": round(r["peak_mb"] - r["loaded_mb"]),
        "same_as_plain": same,
    }


def format_row(row: dict) -> str:
    return (
        f"{row['model']:<20} {row['task']:<12} {row['variant']:<17} "
        f"{row['tokens_per_s']:>9.1f} tok/s  x{row['speedup']:<6.2f} "
        f"peak {row['peak_rss_mb']:>6} MB (+{row['above_model_mb']} MB over the model)  "
        f"same: {'yes' if row['same_as_plain'] else 'NO'}"
    )


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | task | variant | tokens/s | speed-up | peak RSS (MB) | above loaded model (MB) | same result as plain |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['task']} | {row['variant']} | {row['tokens_per_s']:.1f} "
            f"| {row['speedup']:.2f}x | {row['peak_rss_mb']} | {row['above_model_mb']} "
            f"| {'yes' if row['same_as_plain'] else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
