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
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from measurements import (  # noqa: E402
    BATCH_SIZE,
    PROCESSES,
    measure_generation,
    measure_processes,
    measure_training,
)
from report import claim_checks, format_row, lora_lines, markdown_table, process_lines, table_row  # noqa: E402

from course.artifacts import write_atomic  # noqa: E402
from course.settings import resolve_model_name  # noqa: E402

TRAIN_ROWS = ["book fp32", "fast fp32", "fast bf16", "fast fp32 LoRA r16", "fast fp32 2 processes"]
GENERATION_ROWS = ["book generate", "cached", "cached + batched", "batched, no oneDNN"]


def main() -> int:
    args = parse_args()
    if args.child:  # one measurement, printed as JSON
        return run_measurement(json.loads(args.child))
    bf16 = cpu_has_bf16() if args.bf16 == "auto" else args.bf16 == "yes"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    machine, settings = machine_description(), settings_description(args)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Machine: {machine}\n{settings}\n", flush=True)
    rows = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model_name = resolve_model_name(model_name)
        if "train" not in skip:
            rows += training_rows(model_name, args, bf16, skip)
        if "generate" not in skip:
            rows += generation_rows(model_name, args)
    checks, ok = claim_checks(rows)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    load = (
        f"Load average (1 min) of the machine: {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end (other programs share the cores; CPU time counts "
        "only this benchmark's own work)."
    )
    report = (
        f"Machine: {machine}\n\n{settings}\n\n{load}\n\nCommand: `{command_line(args)}`\n\n"
        f"{markdown_table(rows)}\n\n{lora_lines(rows)}{process_lines(rows)}{checks}\n"
    )
    print("\n" + report)
    if args.output:
        write_atomic(args.output, report.encode("utf-8"))
    return 0 if ok else 1


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


def run_measurement(job: dict) -> int:
    """The child process: one measurement, printed as a line of JSON (by rank 0 only)."""
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


def machine_description() -> str:
    return (
        f"{cpu_description()}, {os.cpu_count()} cores ({torch.get_num_threads()} threads, "
        f"PyTorch's default), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 instructions: "
        f"{'yes' if cpu_has_bf16() else 'no'}"
    )


def settings_description(args: argparse.Namespace) -> str:
    return (
        f"Settings: {args.train_steps} timed training steps of batch {BATCH_SIZE} "
        f"(after one warm-up step); {args.gen_prompts} test prompts x up to "
        f"{args.max_new_tokens} new tokens (greedy, stopping at <|endoftext|>), "
        f"generate_batch batch size {args.batch_size}; the fastest of {args.repeat} "
        "timed pass(es) of each."
    )


def command_line(args: argparse.Namespace) -> str:
    """The command that made this report, without its --output path."""
    options = [a for a in sys.argv[1:] if not a.startswith("--output")]
    if args.output and args.output in options:  # "--output PATH": leave the path out
        options.remove(args.output)
    return ("python benchmarks/benchmark.py " + " ".join(options)).strip()


def training_rows(model_name: str, args: argparse.Namespace, bf16: bool, skip: set) -> list:
    """The fine-tuning rows of one model, each measured in its own process."""
    variants = [
        v
        for v in TRAIN_ROWS
        if (bf16 or "bf16" not in v)
        and ("lora" not in skip or "LoRA" not in v)
        and ("processes" not in skip or not v.endswith("processes"))
    ]
    rows, base = [], None
    for variant in variants:
        job = {"task": "train", "model": model_name, "variant": variant}
        r = run_child({**job, "steps": args.train_steps, "repeat": args.repeat})
        base = base or r
        # bf16 computes the same function less precisely; LoRA starts as a no-op
        tolerance = 0.02 * abs(base["first_loss"]) if "bf16" in variant else 1e-4
        same = abs(r["first_loss"] - base["first_loss"]) <= tolerance
        rows.append(table_row(model_name, "fine-tuning", variant, r, base, same))
        print(format_row(rows[-1]), flush=True)
    return rows


def generation_rows(model_name: str, args: argparse.Namespace) -> list:
    """The generation rows of one model, each measured in its own process."""
    rows, base = [], None
    for variant in GENERATION_ROWS:
        job = {"task": "generate", "model": model_name, "variant": variant}
        job.update(prompts=args.gen_prompts, max_new=args.max_new_tokens)
        r = run_child({**job, "batch": args.batch_size, "repeat": args.repeat})
        base = base or r
        same = r["digest"] == base["digest"]
        rows.append(table_row(model_name, "generation", variant, r, base, same))
        print(format_row(rows[-1]), flush=True)
    return rows


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


if __name__ == "__main__":
    sys.exit(main())
