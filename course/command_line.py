"""The command-line flags that `run_course.py` and `python -m course.finetune` share.

Each flag sets the COURSE_* variable the notebooks' parameters cell reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_course_flags(
    parser: argparse.ArgumentParser, options: list[tuple[str, str, str]], artifacts_help: str
) -> None:
    """The flags of `options` (flag, COURSE_* variable, help), --offline,
    --mask-instructions and --artifacts."""
    for flag, name, text in options:
        parser.add_argument(flag, help=f"{text}; sets {name}")
    parser.add_argument(
        "--offline", action="store_true", help="the offline model (= --model offline)"
    )
    parser.add_argument(
        "--mask-instructions",
        action="store_true",
        help="mask the prompt in the loss (exercise 7.2); sets COURSE_MASK_INSTRUCTIONS",
    )
    parser.add_argument("--artifacts", help=artifacts_help)


def check_course_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with argparse's usage message when the shared flags contradict each other."""
    if args.offline and args.model not in (None, "offline"):
        parser.error(f"--offline and --model {args.model} contradict each other: choose one.")


def course_variables(
    args: argparse.Namespace, options: list[tuple[str, str, str]], base: dict[str, str]
) -> dict[str, str]:
    """`base` with the COURSE_* variables the shared flags set.

    Paths given on the command line (--models-dir, --artifacts, a --dataset file) count
    from the current folder: they are made absolute, since the notebooks' kernels run
    in the course's folder.
    """
    env = dict(base)
    for flag, name, _ in options:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            env[name] = str(value)
    if args.offline:
        env["COURSE_MODEL"] = "offline"
    if args.mask_instructions:
        env["COURSE_MASK_INSTRUCTIONS"] = "true"
    if args.models_dir is not None:
        env["COURSE_MODELS_DIR"] = str(Path(args.models_dir).expanduser().resolve())
    if args.artifacts:
        env["COURSE_ARTIFACTS"] = str(Path(args.artifacts).expanduser().resolve())
    dataset = env.get("COURSE_DATASET", "").strip()
    if dataset and dataset not in ("book", "alpaca") and "://" not in dataset:
        if Path(dataset).exists():  # a file given relative to here
            env["COURSE_DATASET"] = str(Path(dataset).resolve())
    return env
