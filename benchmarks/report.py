"""The report of benchmarks/benchmark.py: a row per measurement with its speed-up over
the book's code, the Markdown table, LoRA and several processes against the fast row,
and the course's speed claims checked against this run.
"""

from __future__ import annotations

from measurements import BATCH_SIZE, PROCESSES

# the course's claims: (row, the speed-up over the book's row it must reach at least)
CLAIMS = [("fast fp32", 1.4), ("fast bf16", 3.0), ("cached + batched", 20.0)]


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
