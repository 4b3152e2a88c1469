"""Run the whole course: the nine notebooks in order, each in a fresh kernel, then a summary.

The command a student or instructor runs (`python run_course.py --offline`, see README.md).
"""

#     python run_course.py --offline            # the tiny offline model: no network, minutes on a CPU
#     python run_course.py                      # the book's run: GPT-2 medium, judge llama3
#     python run_course.py --model gpt2-small --epochs 1
#     python run_course.py --from 05            # continue from notebook 05
#     python run_course.py --only 09            # just one (or a few: --only 07,08)
#     python run_course.py --bonus              # 01-09, then the bonus notebooks 10 (DPO), 11 and 12
#     python run_course.py --only 11            # only one bonus notebook (11: export to GGUF, Ollama)
#
# Each option sets the COURSE_* environment variable that the notebooks' parameters
# cell reads, so the notebooks run unchanged. Every setting (and OLLAMA_HOST) is checked
# before anything runs. Executed copies of the notebooks (with every output) are written
# to artifacts/executed/. The run stops at the first failing notebook and names the cell
# and the error; Ctrl+C stops it and says where to continue. At the end it prints a
# summary read from the artifacts: model, device, precision, final losses, training
# time, responses and the judge's average score.

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from course import command_line, settings
from course.notebook_run import run_notebook
from course.summary import format_summary, read_summary

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
    env = command_line.course_variables(args, OPTIONS, os.environ if base is None else base)
    if not args.artifacts:  # COURSE_ARTIFACTS as in the notebooks: from the course folder
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
# The command
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the course notebooks in order, each in a fresh kernel.",
        epilog="Options not given keep the notebooks' defaults (or your COURSE_* variables).",
    )
    command_line.add_course_flags(
        parser,
        OPTIONS,
        artifacts_help="folder for the artifacts, from the current folder; sets COURSE_ARTIFACTS "
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
    command_line.check_course_flags(parser, args)
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
