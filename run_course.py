"""Run the whole course: the nine notebooks in order, each in a fresh kernel.

    python run_course.py                      # the book's run: GPT-2 medium, judge llama3
    python run_course.py --offline            # the tiny offline model: no network, minutes on a CPU
    python run_course.py --model gpt2-small --epochs 1
    python run_course.py --from 05            # continue from notebook 05
    python run_course.py --only 09            # just one (or a few: --only 07,08)

Each option sets the COURSE_* environment variable that the notebooks' parameters
cell reads, so the notebooks run unchanged. Executed copies of the notebooks (with
every output) are written to artifacts/executed/. The run stops at the first failing
notebook and names the cell and the error; at the end it prints a summary read from
the artifacts: model, device, precision, final losses, training time, responses and
the judge's average score.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nbformat
from nbclient import NotebookClient

import helpers

ROOT = Path(__file__).resolve().parent
NOTEBOOK_GLOB = "0[1-9]_*.ipynb"
DEFAULT_MODEL = "gpt2-medium (355M)"
DEFAULT_JUDGE = "llama3"
WEIGHT_NOTEBOOKS = ("04_", "05_")  # the notebooks that load pretrained GPT-2 weights
SCORING_NOTEBOOK = "09_"

# command-line option -> environment variable of the parameters cell
OPTIONS = [
    (
        "--model",
        "COURSE_MODEL",
        "gpt2-small, gpt2-medium (default), gpt2-large, gpt2-xl or offline",
    ),
    ("--judge-model", "COURSE_JUDGE_MODEL", "the Ollama model that scores the responses (llama3)"),
    ("--epochs", "COURSE_EPOCHS", "training epochs (2)"),
    ("--batch-size", "COURSE_BATCH_SIZE", "batch size (8)"),
    ("--lr", "COURSE_LR", "learning rate (5e-5)"),
    ("--weight-decay", "COURSE_WEIGHT_DECAY", "AdamW weight decay (0.1)"),
    ("--seed", "COURSE_SEED", "random seed (123)"),
    ("--device", "COURSE_DEVICE", "auto (default), cuda, mps or cpu"),
    ("--precision", "COURSE_PRECISION", "auto (default), fp32, fp16 or bf16"),
    ("--prompt-style", "COURSE_PROMPT_STYLE", "alpaca (default) or phi3"),
    ("--models-dir", "COURSE_MODELS_DIR", "where GPT-2 weights are cached (gpt2/)"),
]


def find_notebooks(root: str | Path = ROOT) -> list[Path]:
    """The course notebooks (01_... to 09_...), in order."""
    return sorted(Path(root).glob(NOTEBOOK_GLOB))


def _number(name: str) -> str:
    return Path(name).name[:2]


def select_notebooks(
    notebooks: list[Path], only: str | None = None, start: str | None = None
) -> list[Path]:
    """The notebooks `--only` (comma-separated numbers or names) or `--from` asks for."""
    available = ", ".join(_number(p.name) for p in notebooks) or "none"
    selected = notebooks
    if start:
        key = start.strip().zfill(2)[:2]
        if key not in [_number(p.name) for p in notebooks]:
            raise ValueError(f"--from {start}: no such notebook (there are: {available}).")
        selected = [p for p in selected if _number(p.name) >= key]
    if only:
        wanted = []
        for item in only.split(","):
            item = item.strip()
            matches = [
                p
                for p in notebooks
                if p.stem == Path(item).stem or _number(p.name) == item.zfill(2)
            ]
            if not matches:
                raise ValueError(f"--only {item}: no such notebook (there are: {available}).")
            wanted.extend(matches)
        selected = [p for p in selected if p in wanted]
    return selected


def course_settings(args: argparse.Namespace, base: dict[str, str] | None = None) -> dict[str, str]:
    """The COURSE_* variables for the kernels: the options given, over `base` (os.environ)."""
    env = dict(os.environ if base is None else base)
    for flag, name, _ in OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            env[name] = str(value)
    if args.offline:
        env["COURSE_MODEL"] = "offline"
    if args.mask_instructions:
        env["COURSE_MASK_INSTRUCTIONS"] = "true"
    if args.models_dir is not None:
        env["COURSE_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    artifacts = args.artifacts or env.get("COURSE_ARTIFACTS") or str(ROOT / "artifacts")
    env["COURSE_ARTIFACTS"] = str(Path(artifacts).resolve())
    return env


# ---------------------------------------------------------------------------
# Checks before a long run
# ---------------------------------------------------------------------------


def can_connect(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def weights_cached(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete GPT-2 download (or a safetensors file)."""
    if all((model_dir / name).exists() for name in helpers.GPT2_FILES):
        return True
    return any(model_dir.glob("*.safetensors"))


def weights_problem(
    model: str, models_dir: Path, connect: Callable[[str, int], bool] = can_connect
) -> str | None:
    """Why the GPT-2 weights can be neither found nor downloaded (None: they can)."""
    model = helpers.resolve_model_name(model)
    if model == helpers.OFFLINE_MODEL:
        return None
    size = model.split("(")[1].rstrip(")")
    model_dir = models_dir / size
    if weights_cached(model_dir):
        return None
    sources = (helpers.GPT2_BASE_URL, helpers.GPT2_BACKUP_BASE_URL, helpers.SAFETENSORS_BASE_URL)
    hosts = [urlparse(url).hostname for url in sources]
    if any(connect(host, 443) for host in hosts):
        return None
    return (
        f"The GPT-2 {size} weights are not in {model_dir} and no download host "
        f"({', '.join(hosts)}) can be reached: there seems to be no network.\n"
        "Run the course with the offline model instead (tiny, random weights, its answers "
        "are noise, but every step runs):\n\n"
        "    python run_course.py --offline\n\n"
        f"or copy the files {', '.join(helpers.GPT2_FILES)} of GPT-2 {size} into {model_dir}."
    )


def judge_problem(judge_model: str, host: str | None = None, timeout: float = 5.0) -> str | None:
    """Why the Ollama judge cannot score (None: it can), saying what to start or pull."""
    try:
        helpers.ollama_status(judge_model, host, timeout=timeout)
    except helpers.JudgeError as exc:
        return f"{exc}\nThen score with: python run_course.py --only 09"
    return None


# ---------------------------------------------------------------------------
# Running one notebook
# ---------------------------------------------------------------------------


@dataclass
class NotebookRun:
    """How one notebook went."""

    name: str
    seconds: float
    executed: Path
    ok: bool = True
    cell_index: int | None = None
    cell_first_line: str = ""
    ename: str = ""
    evalue: str = ""

    def failure_report(self) -> str:
        return (
            f"{self.name} failed in cell {self.cell_index} (counting from 0): "
            f"{self.cell_first_line}\n"
            f"  {self.ename}: {self.evalue}\n"
            f"The executed notebook, with the full traceback: {self.executed}\n"
            f"What the kernel itself printed: {self.executed.with_suffix('.kernel.log')}"
        )


def run_notebook(
    path: Path,
    executed_dir: Path,
    env: dict[str, str],
    cwd: Path = ROOT,
    timeout: int | None = None,
    kernel_name: str = "python3",
) -> NotebookRun:
    """Execute one notebook top to bottom in a fresh kernel; save the executed copy."""
    nb = nbformat.read(path, as_version=4)
    current = {"index": None}

    def on_cell_start(cell, cell_index, **_):
        current["index"] = cell_index

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(cwd)}},
        on_cell_start=on_cell_start,
    )
    executed = Path(executed_dir) / path.name
    result = NotebookRun(path.name, 0.0, executed)
    executed.parent.mkdir(parents=True, exist_ok=True)
    kernel_log = open(executed.with_suffix(".kernel.log"), "wb")  # the kernel's own messages
    start = time.perf_counter()
    try:
        client.execute(env=env, stdout=kernel_log, stderr=kernel_log)
    except Exception as exc:  # CellExecutionError, CellTimeoutError, DeadKernelError, ...
        result.ok = False
        result.ename = getattr(exc, "ename", None) or type(exc).__name__
        text = str(exc).strip()
        result.evalue = getattr(exc, "evalue", None) or (text.splitlines()[-1] if text else "")
        if current["index"] is not None:
            result.cell_index = current["index"]
            source = nb.cells[current["index"]].source.strip()
            result.cell_first_line = source.splitlines()[0] if source else "(empty cell)"
    finally:
        result.seconds = time.perf_counter() - start
        kernel_log.close()
        nbformat.write(nb, executed)
    return result


# ---------------------------------------------------------------------------
# The summary, read from the artifacts
# ---------------------------------------------------------------------------


def _find(obj: Any, names: tuple[str, ...]) -> Any:
    """The value of the first of `names` in a (nested) dict, top level first."""
    if not isinstance(obj, dict):
        return None
    for name in names:
        if obj.get(name) is not None:
            return obj[name]
    for value in obj.values():
        found = _find(value, names)
        if found is not None:
            return found
    return None


def _last_number(value: Any) -> float | None:
    if isinstance(value, list):
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return float(numbers[-1]) if numbers else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_summary(artifacts: Path, model: str) -> dict[str, Any]:
    """What the run produced, from notebook 05's training log, 07's responses and 09's scores."""
    stem = helpers.model_file_stem(model)
    summary: dict[str, Any] = {"model": helpers.resolve_model_name(model)}
    log = _read_json(artifacts / f"{stem}-training-log.json")
    if isinstance(log, dict):
        summary["device"] = _find(log, ("device",))
        summary["precision"] = _find(log, ("precision", "dtype", "amp_dtype"))
        final = log.get("final_losses") if isinstance(log.get("final_losses"), dict) else {}
        summary["train_loss"] = _last_number(final.get("train")) or _last_number(
            _find(log, ("final_train_loss", "train_losses", "train_loss"))
        )
        summary["val_loss"] = _last_number(final.get("val")) or _last_number(
            _find(log, ("final_val_loss", "val_losses", "val_loss"))
        )
        minutes = _last_number(_find(log, ("training_minutes", "minutes", "duration_minutes")))
        if minutes is None:
            seconds = _last_number(
                _find(
                    log,
                    (
                        "train_seconds",
                        "training_seconds",
                        "duration_seconds",
                        "elapsed_seconds",
                        "seconds",
                        "duration_s",
                        "duration",
                    ),
                )
            )
            minutes = None if seconds is None else seconds / 60
        summary["training_minutes"] = minutes
    responses = _read_json(artifacts / f"{stem}-instruction-data-with-response.json")
    if isinstance(responses, dict):
        responses = _find(responses, ("responses", "entries", "data"))
    if isinstance(responses, list):
        summary["responses"] = sum(
            1 for e in responses if isinstance(e, dict) and e.get("model_response") is not None
        )
    scores = _read_json(artifacts / f"{stem}-scores.json")
    if isinstance(scores, dict) and isinstance(scores.get("runs"), list):
        # helpers.generate_model_scores: one list of entries per scoring run
        averages, scored = [], []
        for run in scores["runs"]:
            numbers = [
                e["score"]
                for e in run.get("entries", [])
                if isinstance(e, dict) and isinstance(e.get("score"), (int, float))
            ]
            if numbers:
                averages.append(sum(numbers) / len(numbers))
                scored.append(len(numbers))
        if averages:
            summary["average_score"] = sum(averages) / len(averages)
            summary["scored"] = scored[0]
            summary["score_runs"] = len(averages)
        summary["judge"] = _find(scores.get("judge"), ("tag", "model"))
    return summary


def _fmt(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    return format(value, spec)


def format_summary(summary: dict[str, Any], judge_note: str | None = None) -> str:
    """The end-of-run summary, one fact a line."""
    lines = ["", "Summary", f"  model              {summary['model']}"]
    if "device" in summary:
        lines.append(
            f"  device, precision  {_fmt(summary['device'])}, {_fmt(summary['precision'])}"
        )
        lines.append(
            f"  final loss         train {_fmt(summary['train_loss'], '.3f')}, "
            f"val {_fmt(summary['val_loss'], '.3f')}"
        )
        lines.append(f"  training time      {_fmt(summary['training_minutes'], '.2f')} min")
    else:
        lines.append("  training           no training log (notebook 05 has not run)")
    if "responses" in summary:
        lines.append(f"  responses written  {summary['responses']}")
    else:
        lines.append("  responses          none yet (notebook 07 has not run)")
    if judge_note:
        lines.append("  judge score        not scored:")
        lines.extend("    " + line for line in judge_note.splitlines())
    elif summary.get("average_score") is not None:
        scored = f" over {summary['scored']} responses" if "scored" in summary else ""
        runs = summary.get("score_runs", 1)
        by = f" (judge {summary.get('judge') or '?'}" + (
            f", mean of {runs} runs)" if runs > 1 else ")"
        )
        lines.append(f"  judge score        average {summary['average_score']:.2f}{scored}{by}")
    else:
        lines.append("  judge score        none yet (notebook 09 has not run)")
    if summary["model"] == helpers.OFFLINE_MODEL:
        lines.append("  (the offline model has random weights: its responses and scores are noise)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the nine course notebooks in order, each in a fresh kernel.",
        epilog="Options not given keep the notebooks' defaults (or your COURSE_* variables).",
    )
    for flag, name, text in OPTIONS:
        parser.add_argument(flag, help=f"{text}; sets {name}")
    parser.add_argument(
        "--offline", action="store_true", help="the offline model (= --model offline)"
    )
    parser.add_argument(
        "--mask-instructions",
        action="store_true",
        help="mask the prompt in the loss (exercise 7.2)",
    )
    parser.add_argument(
        "--artifacts", help="folder for the artifacts (artifacts/); sets COURSE_ARTIFACTS"
    )
    parser.add_argument("--only", help="run only these notebooks, e.g. 07,08")
    parser.add_argument("--from", dest="start", help="start at this notebook, e.g. 05")
    parser.add_argument(
        "--cell-timeout", type=int, default=None, help="seconds per cell (no limit)"
    )
    args = parser.parse_args(argv)
    if args.offline and args.model not in (None, "offline"):
        parser.error(f"--offline and --model {args.model} contradict each other: choose one.")
    model = "offline" if args.offline else args.model
    if model is not None:
        try:
            helpers.resolve_model_name(model)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def main(
    argv: list[str] | None = None,
    root: Path = ROOT,
    connect: Callable[[str, int], bool] = can_connect,
) -> int:
    args = parse_args(argv)
    env = course_settings(args)
    try:
        model = helpers.resolve_model_name(env.get("COURSE_MODEL") or DEFAULT_MODEL)
    except ValueError as exc:
        print(f"COURSE_MODEL: {exc}")
        return 2
    judge_model = env.get("COURSE_JUDGE_MODEL") or DEFAULT_JUDGE
    artifacts = Path(env["COURSE_ARTIFACTS"])
    try:
        notebooks = select_notebooks(find_notebooks(root), args.only, args.start)
    except ValueError as exc:
        print(exc)
        return 2
    if not notebooks:
        print(f"No notebooks to run in {root}.")
        return 2

    if any(p.name.startswith(WEIGHT_NOTEBOOKS) for p in notebooks):
        models_dir = Path(env.get("COURSE_MODELS_DIR") or "gpt2")
        problem = weights_problem(
            model, models_dir if models_dir.is_absolute() else root / models_dir, connect
        )
        if problem:
            print(problem)
            return 2

    print(f"Running {len(notebooks)} notebook(s) with {model}; artifacts in {artifacts}")
    executed_dir = artifacts / "executed"
    judge_note = None
    started = time.perf_counter()
    for path in notebooks:
        if path.name.startswith(SCORING_NOTEBOOK):
            judge_note = judge_problem(judge_model, env.get("OLLAMA_HOST"))
            if judge_note:
                print(f"{path.name:45s} skipped: no judge")
                continue
        print(f"{path.name:45s}", end=" ", flush=True)
        try:
            run = run_notebook(path, executed_dir, env, cwd=root, timeout=args.cell_timeout)
        except KeyboardInterrupt:
            print(f"interrupted. Continue with: python run_course.py --from {_number(path.name)}")
            return 130
        if not run.ok:
            print(f"FAILED after {run.seconds:.1f} s")
            print(run.failure_report())
            return 1
        print(f"{run.seconds:7.1f} s")
    minutes = (time.perf_counter() - started) / 60
    print(f"All done in {minutes:.1f} min. Executed notebooks: {executed_dir}")
    print(format_summary(read_summary(artifacts, model), judge_note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
