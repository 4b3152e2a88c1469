"""Run the whole course: the nine notebooks in order, each in a fresh kernel.

    python run_course.py --offline            # the tiny offline model: no network, minutes on a CPU
    python run_course.py                      # the book's run: GPT-2 medium, judge llama3
    python run_course.py --model gpt2-small --epochs 1
    python run_course.py --from 05            # continue from notebook 05
    python run_course.py --only 09            # just one (or a few: --only 07,08)
    python run_course.py --bonus              # 01-09, then the bonus notebooks 10 (DPO), 11 and 12
    python run_course.py --only 11            # only one bonus notebook (11: export to GGUF, Ollama)

Each option sets the COURSE_* environment variable that the notebooks' parameters
cell reads, so the notebooks run unchanged. Every setting (and OLLAMA_HOST) is checked
before anything runs. Executed copies of the notebooks (with every output) are written
to artifacts/executed/. The run stops at the first failing notebook and names the cell
and the error; Ctrl+C stops it and says where to continue. At the end it prints a
summary read from the artifacts: model, device, precision, final losses, training
time, responses and the judge's average score.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nbformat
from nbclient import NotebookClient

from course import artifacts, settings

ROOT = Path(__file__).resolve().parent
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
BONUS = ("10", "11", "12")  # run only when asked: --bonus, or --only 10 / 11 / 12
WEIGHT_NOTEBOOKS = ("04_", "05_")  # the notebooks that load pretrained GPT-2 weights
SCORING_NOTEBOOK = ("09_", "12_")  # the notebooks that ask the judge

# command-line option -> environment variable of the parameters cell
OPTIONS = settings.COMMAND_LINE_OPTIONS


def find_notebooks(root: str | Path = ROOT) -> list[Path]:
    """The course notebooks (01_... to 09_..., and the bonus 10_... and 11_...), in order."""
    return sorted(Path(root).glob(NOTEBOOK_GLOB))


def _number(name: str | Path) -> str:
    return Path(name).name[:2]


def select_notebooks(
    notebooks: list[Path], only: str | None = None, start: str | None = None, bonus: bool = False
) -> list[Path]:
    """The notebooks `--only` (numbers or names) or `--from` asks for.

    The bonus notebooks (10, 11, 12) run only with `bonus` or when `--only` names them.
    """
    available = ", ".join(_number(p) for p in notebooks) or "none"
    selected = [p for p in notebooks if bonus or _number(p) not in BONUS]
    if start:
        key = start.strip().zfill(2)[:2]
        if key not in [_number(p) for p in notebooks]:
            raise ValueError(f"--from {start}: no such notebook (there are: {available}).")
        if key in BONUS:
            selected = [p for p in notebooks if _number(p) >= key]
        selected = [p for p in selected if _number(p) >= key]
    if only:
        wanted = []
        for item in only.split(","):
            item = item.strip()
            matches = [
                p for p in notebooks if p.stem == Path(item).stem or _number(p) == item.zfill(2)
            ]
            if not matches:
                raise ValueError(f"--only {item}: no such notebook (there are: {available}).")
            wanted.extend(matches)
        selected = [p for p in notebooks if p in wanted]
    return selected


def course_settings(args: argparse.Namespace, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the kernels: the options given, over `base` (os.environ)."""
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
    dataset = env.get("COURSE_DATASET", "").strip()
    if dataset and dataset not in ("book", "alpaca") and "://" not in dataset:
        if Path(dataset).exists():  # a file given relative to here: the kernels run elsewhere
            env["COURSE_DATASET"] = str(Path(dataset).resolve())
    if args.artifacts:  # a path on the command line counts from the current folder
        env["COURSE_ARTIFACTS"] = str(Path(args.artifacts).expanduser().resolve())
    else:  # the variable means what it means in the notebooks: from the course folder
        folder = Path(os.path.expanduser(env.get("COURSE_ARTIFACTS", "").strip() or "artifacts"))
        env["COURSE_ARTIFACTS"] = str((settings.ROOT / folder).resolve())
    return env


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ is `env` inside the block (the course modules read their settings there)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------
# Checks before a long run
# ---------------------------------------------------------------------------


def settings_problems(env: dict[str, str], scoring: bool = True) -> list[str]:
    """Every COURSE_* variable (and, when notebook 09 runs, OLLAMA_HOST) the run cannot use."""
    problems = settings.check_all(env)
    host = env.get("OLLAMA_HOST", "")
    if scoring and host.strip():
        from course import judge

        try:
            judge.ollama_host(host)
        except judge.JudgeError as exc:
            problems.append(f"OLLAMA_HOST: {exc}")
    return problems


def can_connect(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def weights_cached(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete GPT-2 download (or a safetensors file)."""
    from course import weights

    if all((model_dir / name).exists() for name in weights.GPT2_FILES):
        return True
    return any(model_dir.glob("*.safetensors"))


def weights_problem(
    model: str, models_dir: Path, connect: Callable[[str, int], bool] = can_connect
) -> str | None:
    """Why the GPT-2 weights can be neither found nor downloaded (None: they can)."""
    from course import weights

    model = settings.resolve_model_name(model)
    if model == settings.OFFLINE_MODEL:
        return None
    size = settings.model_size(model)
    model_dir = models_dir / size
    if weights_cached(model_dir):
        return None
    sources = (weights.GPT2_BASE_URL, weights.GPT2_BACKUP_BASE_URL, weights.SAFETENSORS_BASE_URL)
    hosts = [urlparse(url).hostname for url in sources]
    if any(connect(host, 443) for host in hosts):
        return None
    return (
        f"The GPT-2 {size} weights are not in {model_dir} and no download host "
        f"({', '.join(hosts)}) can be reached: there seems to be no network.\n"
        "Run the course with the offline model instead (tiny, random weights, its answers "
        "are noise, but every step runs):\n\n"
        "    python run_course.py --offline\n\n"
        f"or copy the files {', '.join(weights.GPT2_FILES)} of GPT-2 {size} into {model_dir}."
    )


def judge_problem(judge_model: str, host: str | None = None, timeout: float = 5.0) -> str | None:
    """Why the Ollama judge cannot score (None: it can), saying what to start or pull."""
    from course import judge

    try:
        judge.ollama_status(judge_model, host, timeout=timeout)
    except judge.JudgeError as exc:
        return f"{exc}\nThen score with: python run_course.py --only 09"
    return None


def write_problem(exc: OSError, what: str, start: str | None = None) -> str:
    """A full or read-only disk (or another write error) in words, with what to do."""
    again = f" Then continue with: python run_course.py --from {start}" if start else ""
    where = exc.filename or what
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (
            f"The disk is full: could not write {where} ({exc.strerror}). Free some space, or "
            f"write the artifacts to another disk with --artifacts FOLDER.{again}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"Cannot write {where}: the folder is not writable ({exc.strerror}). Choose a "
            f"folder you can write to with --artifacts FOLDER.{again}"
        )
    return f"Could not write {where}: {exc.strerror or exc}.{again}"


def check_writable(folder: Path) -> str | None:
    """None when files can be written in `folder` (made if missing), else what is wrong."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"run_course.py checks that it can write here")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return write_problem(exc, str(folder))
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
    interrupted: bool = False
    cell_index: int | None = None
    cell_first_line: str = ""
    ename: str = ""
    evalue: str = ""
    kernel_exit: int | None = None  # the kernel process's exit code (-9: killed by SIGKILL)

    def failure_report(self) -> str:
        report = (
            f"{self.name} failed in cell {self.cell_index} (counting from 0): "
            f"{self.cell_first_line}\n"
            f"  {self.ename}: {self.evalue}\n"
        )
        if self.ename == "DeadKernelError":
            report += self.dead_kernel_advice() + "\n"
        return report + (
            f"The executed notebook, with the full traceback: {self.executed}\n"
            f"What the kernel itself printed: {self.executed.with_suffix('.kernel.log')}"
        )

    def dead_kernel_advice(self) -> str:
        """What a student does when the kernel died under a cell (usually: out of memory)."""
        how = ""
        if self.kernel_exit is not None and self.kernel_exit < 0:
            with contextlib.suppress(ValueError):
                how = f" (it was killed: {signal.Signals(-self.kernel_exit).name})"
        elif self.kernel_exit is not None:
            how = f" (it exited with code {self.kernel_exit})"
        return (
            f"The Python kernel died while running this cell{how}. Most often the machine "
            "ran out of memory, and the system stopped the process that used the most.\n"
            "Use a smaller model (--model gpt2-small, or --offline) or a smaller batch "
            "(--batch-size 4; for notebook 07's generation COURSE_GENERATION_BATCH_SIZE=2), "
            "then run it again from this notebook, with the same options:\n"
            f"    python run_course.py --from {_number(self.name)}"
        )


def run_notebook(
    path: Path,
    executed_dir: Path,
    env: dict[str, str],
    cwd: Path = ROOT,
    timeout: int | None = None,
    kernel_name: str = "python3",
) -> NotebookRun:
    """Execute one notebook top to bottom in a fresh kernel; save the executed copy.

    The stored outputs are cleared first, so the executed copy of a notebook that
    failed shows only what this run printed. Ctrl+C interrupts the kernel and ends
    with `result.interrupted`.
    """
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    current: dict[str, Any] = {"index": None, "process": None}
    interrupted: list[bool] = []

    def on_sigint() -> None:  # Ctrl+C: interrupt the running cell, as Jupyter's stop button
        interrupted.append(True)
        process = getattr(getattr(client.km, "provisioner", None), "process", None)
        if process is not None:  # pressed again: the kernel does not react, stop it
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGINT if len(interrupted) == 1 else signal.SIGKILL)

    def on_cell_start(cell, cell_index, **_):
        current["index"] = cell_index
        # the kernel process: how it ended tells a crash from being killed for memory
        process = getattr(getattr(client.km, "provisioner", None), "process", None)
        current["process"] = process or current["process"]
        # nbclient's own SIGINT handler shuts the kernel down under the running cell, which
        # ends in an empty AssertionError; this one interrupts the cell instead
        with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, on_sigint)

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
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl+C while the kernel started
        result.ok = False
        interrupted.append(True)
        process = getattr(getattr(client.km, "provisioner", None), "process", None)
        if process is not None and process.poll() is None:
            process.kill()  # nbclient had no time to shut it down
    except Exception as exc:  # CellExecutionError, CellTimeoutError, DeadKernelError, ...
        result.ok = False
        result.ename = getattr(exc, "ename", None) or type(exc).__name__
        text = str(exc).strip()
        result.evalue = getattr(exc, "evalue", None) or (text.splitlines()[-1] if text else "")
        process = current["process"]
        if process is not None and result.ename == "DeadKernelError":
            with contextlib.suppress(Exception):
                result.kernel_exit = process.wait(timeout=5)
        if current["index"] is not None:
            result.cell_index = current["index"]
            source = nb.cells[current["index"]].source.strip()
            result.cell_first_line = source.splitlines()[0] if source else "(empty cell)"
    finally:
        result.seconds = time.perf_counter() - start
        # Ctrl+C before the first cell reaches nbclient's handler, which leaves this behind
        stopped = getattr(client, "_async_cleanup_kernel_future", None) is not None
        result.interrupted = bool(interrupted) or stopped
        kernel_log.close()
        try:
            nbformat.write(nb, executed)
        except BaseException:
            with contextlib.suppress(OSError):
                executed.unlink()  # no half-written copy left behind
            raise
    return result


# ---------------------------------------------------------------------------
# The summary, read from the artifacts (course.artifacts owns their names and formats)
# ---------------------------------------------------------------------------


def read_summary() -> dict[str, Any]:
    """What the run produced, from notebook 05's training log, 07's responses and 09's scores.

    Reads the COURSE_* settings from os.environ (run it inside `environment(env)`).
    """
    from course import scores

    model = settings.setting("COURSE_MODEL")
    stem = artifacts.run_stem(model, settings.dataset_tag(), settings.setting("COURSE_FINETUNE"))
    evaluated = stem if settings.setting("COURSE_STAGE") == "sft" else f"{stem}-dpo"
    judge_model = settings.setting("COURSE_JUDGE_MODEL")
    summary: dict[str, Any] = {"model": model, "stem": stem, "problems": []}

    def read(kind: str, path: Path) -> Any:
        try:
            return artifacts.read_json(path, artifacts.WRITTEN_BY[kind])
        except artifacts.MissingArtifact:
            return None
        except artifacts.ArtifactError as exc:
            summary["problems"].append(str(exc))
            return None

    log = read("training-log", artifacts.path_for("training-log", stem))
    if isinstance(log, dict):  # the keys notebook 05 writes
        final = log.get("final_losses") or {}
        summary.update(
            device=log.get("device"),
            precision=log.get("precision"),
            train_loss=final.get("train"),
            val_loss=final.get("val"),
            training_minutes=log.get("duration_minutes"),
        )
    responses = read("responses", artifacts.path_for("responses", evaluated))
    if isinstance(responses, list):
        summary["responses"] = sum(
            1 for e in responses if isinstance(e, dict) and e.get("model_response") is not None
        )
    scores_path = artifacts.scores_path(evaluated, judge_model)
    if scores_path.exists():
        try:
            runs = scores.summarize_runs(scores_path)
            first = scores.score_summary(scores.load_scores(scores_path))
        except (artifacts.ArtifactError, ValueError, KeyError) as exc:
            summary["problems"].append(f"{scores_path.name}: {exc}")
        else:
            record = scores.read_scores(scores_path)
            summary.update(
                average_score=runs["mean"],
                score_std=runs["std"],
                score_runs=runs["runs"],
                scored=first["scored"],
                judge=record["judge"].get("tag") or judge_model,
            )
    if artifacts.path_for("dpo", stem).exists():
        summary["dpo_model"] = artifacts.path_for("dpo", stem).name
    exported = [artifacts.path_for(kind, stem) for kind in ("sft-gguf", "dpo-gguf")]
    if any(path.exists() for path in exported):
        summary["gguf"] = [path.name for path in exported if path.exists()]
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
        runs = summary["score_runs"]
        spread = f" ± {summary['score_std']:.2f}" if summary.get("score_std") is not None else ""
        by = f"judge {summary['judge']}" + (f", mean of {runs} runs" if runs > 1 else "")
        lines.append(
            f"  judge score        average {summary['average_score']:.2f}{spread} over "
            f"{summary['scored']} responses ({by})"
        )
    else:
        lines.append("  judge score        none yet (notebook 09 has not run)")
    if "dpo_model" in summary:
        lines.append(f"  DPO model (bonus)  {summary['dpo_model']}")
    if "gguf" in summary:
        lines.append(f"  GGUF (bonus)       {', '.join(summary['gguf'])}")
    for problem in summary.get("problems", []):
        lines.append(f"  problem            {problem}")
    if summary["model"] == settings.OFFLINE_MODEL:
        lines.append("  (the offline model has random weights: its responses and scores are noise)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the course notebooks in order, each in a fresh kernel.",
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
        "--artifacts",
        help="folder for the artifacts, from the current folder; sets COURSE_ARTIFACTS "
        "(without it: COURSE_ARTIFACTS, relative to the course folder as in the notebooks, "
        "or artifacts/ there)",
    )
    parser.add_argument(
        "--only", help="run only these notebooks, e.g. 07,08 (or 10 or 11, the bonus ones)"
    )
    parser.add_argument("--from", dest="start", help="start at this notebook, e.g. 05")
    parser.add_argument(
        "--bonus",
        action="store_true",
        help="after 09, run the bonus notebooks 10 (DPO), 11 (GGUF, Ollama) and 12 (the judge)",
    )
    parser.add_argument(
        "--cell-timeout", type=int, default=None, help="seconds per cell (no limit)"
    )
    args = parser.parse_args(argv)
    if args.offline and args.model not in (None, "offline"):
        parser.error(f"--offline and --model {args.model} contradict each other: choose one.")
    return args


def main(
    argv: list[str] | None = None,
    root: Path = ROOT,
    connect: Callable[[str, int], bool] = can_connect,
) -> int:
    args = parse_args(argv)
    env = course_settings(args)
    try:
        notebooks = select_notebooks(find_notebooks(root), args.only, args.start, args.bonus)
    except ValueError as exc:
        print(exc)
        return 2
    if not notebooks:
        print(f"No notebooks to run in {root}.")
        return 2
    scoring = any(p.name.startswith(SCORING_NOTEBOOK) for p in notebooks)
    problems = settings_problems(env, scoring)
    if problems:
        print("Nothing was run: these settings cannot be used.")
        print("\n".join(f"- {problem}" for problem in problems))
        return 2
    with environment(env):
        return _run(args, env, notebooks, root, connect)


def _run(args, env, notebooks, root, connect) -> int:
    model = settings.setting("COURSE_MODEL")
    judge_model = settings.setting("COURSE_JUDGE_MODEL")
    folder = Path(env["COURSE_ARTIFACTS"])
    executed_dir = folder / "executed"
    problem = check_writable(executed_dir)
    if problem:
        print(f"Nothing was run. {problem}")
        return 2
    if any(p.name.startswith(WEIGHT_NOTEBOOKS) for p in notebooks):
        problem = weights_problem(model, settings.models_dir(), connect)
        if problem:
            print(problem)
            return 2

    print(f"Running {len(notebooks)} notebook(s) with {model}; artifacts in {folder}")
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
            run = None
        except OSError as exc:
            print("could not save its executed copy")
            print(write_problem(exc, path.name, _number(path)))
            return 1
        if run is None or run.interrupted:
            print(f"interrupted: continue with --from {_number(path)}")
            return 130
        if not run.ok:
            print(f"FAILED after {run.seconds:.1f} s")
            print(run.failure_report())
            return 1
        print(f"{run.seconds:7.1f} s")
    minutes = (time.perf_counter() - started) / 60
    print(f"All done in {minutes:.1f} min. Executed notebooks: {executed_dir}")
    print(format_summary(read_summary(), judge_note))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C before or between the notebooks
        print("\ninterrupted")
        sys.exit(130)
