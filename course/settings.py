"""The COURSE_* settings, each checked where it is read (a wrong value names the variable and
what it accepts), and the model names. Every notebook's parameters cell reads them through
`setting`; run_course.py checks them all first (`check_all`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helpers

# the course's own folder: shipped files are found relative to it, not the current folder
ROOT = Path(__file__).resolve().parent.parent

OFFLINE_MODEL = "offline (tiny)"
# random weights, written on this machine: for CI and dry runs, its answers are noise
OFFLINE_CONFIG = {"emb_dim": 64, "n_layers": 2, "n_heads": 2}
MODEL_NAMES = [*helpers.model_configs, OFFLINE_MODEL]

# name -> (default, what it accepts): a tuple of choices; numbers from "min" to "max"
# (a dict; "above_min": the minimum itself is not allowed); "model" (a model name);
# "nonempty" (any text); "path" (a folder: a relative one counts from the course's
# folder, not from where Jupyter started); None: any value of the default's type.
#
# The ranges keep out values that cannot work, not merely unusual ones. The learning
# rate is above 0 and at most 1: AdamW fine-tuning uses about 1e-6 to 1e-3 (the book
# 5e-5), and a value of 1 or more only moves weights to noise (COURSE_LR=1e9 gave NaN
# losses from step 0). Values in between that still diverge are stopped by training's
# check for a non-finite loss.
SPEC: dict[str, tuple[Any, Any]] = {
    "COURSE_MODEL": ("gpt2-medium (355M)", "model"),
    "COURSE_PROMPT_STYLE": ("alpaca", ("alpaca", "phi3")),
    "COURSE_MASK_INSTRUCTIONS": (False, None),
    # exercise 7.3: the collate function's allowed_max_length (notebooks 03-05); the book's
    # 1024 is GPT-2's context length, and its advice for too little memory is 512 or 256
    "COURSE_MAX_LENGTH": (1024, {"min": 2, "max": 1024}),
    "COURSE_BATCH_SIZE": (8, {"min": 1, "max": 4096}),
    "COURSE_LR": (5e-5, {"min": 0.0, "max": 1.0, "above_min": True}),
    "COURSE_WEIGHT_DECAY": (0.1, {"min": 0.0, "max": 10.0}),
    "COURSE_EPOCHS": (2, {"min": 1, "max": 1000}),
    "COURSE_SEED": (123, {"min": 0, "max": 2**32 - 1}),
    "COURSE_RETRAIN": (False, None),
    "COURSE_DEVICE": ("auto", ("auto", "cuda", "mps", "cpu")),
    "COURSE_PRECISION": ("auto", ("auto", "fp32", "bf16", "fp16")),
    "COURSE_MAX_NEW_TOKENS": (256, {"min": 1, "max": 1024}),
    "COURSE_GENERATION_BATCH_SIZE": (8, {"min": 1, "max": 1024}),
    "COURSE_JUDGE_MODEL": ("llama3", "nonempty"),
    "COURSE_JUDGE_RUNS": (3, {"min": 1, "max": 100}),
    # exercise 7.3: "book", "alpaca", or a path or URL of a JSON file in the same format
    "COURSE_DATASET": ("book", "nonempty"),
    "COURSE_DATA_LIMIT": (0, {"min": 0, "max": 10_000_000}),  # 0: every entry
    # the largest dataset file a download may bring (Alpaca's is 22 MB)
    "COURSE_DATASET_MAX_MB": (1000, {"min": 1, "max": 1_000_000}),
    # exercise 7.4: "full" fine-tuning (the book's) or "lora"
    "COURSE_FINETUNE": ("full", ("full", "lora")),
    "COURSE_LORA_RANK": (16, {"min": 1, "max": 4096}),
    "COURSE_LORA_ALPHA": (16, {"min": 1, "max": 4096}),
    # which model notebooks 07-09 extract and score: "sft" (notebook 05) or "dpo" (10)
    "COURSE_STAGE": ("sft", ("sft", "dpo")),
    # where notebooks hand results to each other, and where GPT-2 checkpoints are kept
    "COURSE_ARTIFACTS": ("artifacts", "path"),
    "COURSE_MODELS_DIR": ("gpt2", "path"),
    # notebook 10 (bonus), preference tuning with DPO; the defaults are the book's
    "COURSE_DPO_BETA": (0.1, {"min": 0.0, "max": 100.0, "above_min": True}),
    "COURSE_DPO_LR": (5e-6, {"min": 0.0, "max": 1.0, "above_min": True}),
    "COURSE_DPO_EPOCHS": (1, {"min": 1, "max": 100}),
    "COURSE_DPO_LIMIT": (0, {"min": 0, "max": 10_000_000}),  # 0: every training pair
}


class SettingError(ValueError):
    """A COURSE_* variable holds a value the course cannot use."""


def allowed(name: str) -> str:
    """What variable `name` accepts, in words (for messages and the README)."""
    default, accepts = SPEC[name]
    if accepts is None:
        return "1 or 0 (yes or no)" if isinstance(default, bool) else f"a {type(default).__name__}"
    if accepts == "model":
        return "one of " + ", ".join(f'"{n.split(" ")[0]}"' for n in MODEL_NAMES)
    if accepts == "nonempty":
        return "any non-empty text"
    if accepts == "path":
        return "a folder (a relative path counts from the course's folder)"
    if isinstance(accepts, tuple):
        return "one of " + ", ".join(map(repr, accepts))
    kind = "a whole number" if isinstance(default, int) else "a number"
    low = f"above {accepts['min']}" if accepts.get("above_min") else f"from {accepts['min']}"
    return f"{kind} {low} to {accepts['max']}"


def _convert(name: str, raw: str, default: Any) -> Any:
    text = raw.strip()
    what = allowed(name) if name in SPEC else f"a {type(default).__name__}"
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingError(f"{name}={raw!r} is not a yes/no value: use 1 or 0. Fix or unset it.")
    if "_" in text and isinstance(default, (int, float)):
        # Python reads "1_0e-5" as 1e-4 (underscores group digits): surely a typo
        raise SettingError(
            f"{name}={raw!r}: write the number without underscores (for example 5e-5 or "
            f"10000); Python would read it as {text.replace('_', '')}. Fix or unset it."
        )
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise SettingError(
            f"{name}={raw!r} is not {what} (default: {default!r}). Fix or unset it."
        ) from None
    return raw


def check_value(name: str, value: Any, accepts: Any, raw: str | None = None) -> Any:
    """`value` if `accepts` (see SPEC) allows it, else a SettingError naming the range.

    `raw`, the variable's text, is what the message shows (else the value).
    """
    shown = repr(raw.strip()) if raw is not None else repr(value)
    if accepts is None:
        return value
    if accepts == "model":
        try:
            return resolve_model_name(value)
        except ValueError as exc:
            raise SettingError(f"{name}: {exc}") from None
    if accepts == "nonempty":
        if not str(value).strip():
            raise SettingError(f"{name} is empty: set it to {allowed(name)}, or unset it.")
        return value
    if accepts == "path":
        path = Path(os.path.expanduser(str(value).strip()))
        path = path if path.is_absolute() else ROOT / path
        if path.exists() and not path.is_dir():
            raise SettingError(
                f"{name}={shown} is a file, not a folder: set it to {allowed(name)}."
            )
        return str(path)
    if isinstance(accepts, tuple):
        if value not in accepts:
            raise SettingError(
                f"{name}={shown} is not allowed: use one of {', '.join(map(repr, accepts))}."
            )
        return value
    low, high = accepts["min"], accepts["max"]
    bad = isinstance(value, float) and not math.isfinite(value)
    bad = bad or value < low or value > high or (accepts.get("above_min") and value <= low)
    if bad:
        lower = f"above {low}" if accepts.get("above_min") else f"at least {low}"
        raise SettingError(
            f"{name}={shown} is out of range: it must be {lower} and at most {high}. "
            "Fix or unset it."
        )
    return value


def setting(name: str, default: Any = None) -> Any:
    """The value of environment variable `name`, converted and checked; else the default.

    For the variables in SPEC the allowed values come from there, and so does the
    default when none is given; a default given here is checked like a value, and the
    text is converted to the type of SPEC's default. Others take the type of `default`. A folder setting ("path" in SPEC) comes back as an
    absolute path (a string), relative ones counted from the course's folder.
    """
    accepts, kind = None, default
    if name in SPEC:
        kind, accepts = SPEC[name]
        default = kind if default is None else default
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return check_value(name, default, accepts)
    return check_value(name, _convert(name, raw, kind), accepts, raw)


def check_all(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every problem with the COURSE_* variables in `environ` (os.environ), one line each.

    run_course.py calls this before it runs anything, so that a bad value stops the
    run at once with every problem listed, not hours later in notebook 07.
    """
    environ = os.environ if environ is None else environ
    problems = []
    for name, (default, accepts) in SPEC.items():
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            check_value(name, _convert(name, raw, default), accepts, raw)
        except SettingError as exc:
            problems.append(str(exc))
    return problems


def is_set(name: str) -> bool:
    """True when the environment sets `name` to something (not empty)."""
    return bool(os.environ.get(name, "").strip())


TAG_NAME_CHARS = 40  # of a dataset file's name in `dataset_tag`


def dataset_tag(dataset: str | None = None, limit: int | None = None) -> str:
    """A short name for the data a run uses, for artifact names: "book" for the book's.

    "alpaca" stays "alpaca"; a path or URL becomes its file name without extension
    plus 8 characters of a hash of the full path or URL (two files named alike do not
    collide); a COURSE_DATA_LIMIT adds "-n<limit>". Names longer than TAG_NAME_CHARS
    are cut to that length (the hash still tells them apart), so that artifact names
    stay short enough for any file system.
    """
    import hashlib

    dataset = setting("COURSE_DATASET") if dataset is None else dataset
    limit = setting("COURSE_DATA_LIMIT") if limit is None else limit
    if dataset in ("book", "alpaca"):
        tag = dataset
    else:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(dataset.split("?")[0]).stem).strip("-")
        name = name[:TAG_NAME_CHARS].rstrip("-")
        tag = f"{name or 'data'}-{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"
    return tag if not limit else f"{tag}-n{limit}"


# -- model names ------------------------------------------------------------------


def resolve_model_name(name: str) -> str:
    """Accept "gpt2-medium", "gpt2-medium (355M)", "355M" or "offline"."""
    for full_name in MODEL_NAMES:
        short = full_name.split(" ")[0]
        size = full_name.split("(")[1].rstrip(")")
        if str(name).strip() in (full_name, short, size):
            return full_name
    raise ValueError(
        f"Unknown model {name!r}. Choose one of: "
        + ", ".join(f'"{n.split(" ")[0]}"' for n in MODEL_NAMES)
    )


def model_config(name: str) -> dict:
    """The full GPTModel configuration (BASE_CONFIG and the size's dict) for a model name."""
    name = resolve_model_name(name)
    size = OFFLINE_CONFIG if name == OFFLINE_MODEL else helpers.model_configs[name]
    return {**helpers.BASE_CONFIG, **size}


def model_size(name: str) -> str:
    """The download's size name: "gpt2-medium (355M)" -> "355M", the offline model -> "offline"."""
    return resolve_model_name(name).split("(")[1].rstrip(")").replace("tiny", "offline")


def model_file_stem(name: str) -> str:
    """The book's file naming: "gpt2-medium (355M)" -> "gpt2-medium355M"."""
    return re.sub(r"[ ()]", "", resolve_model_name(name))


def models_dir() -> Path:
    """Where GPT-2 checkpoints are cached (COURSE_MODELS_DIR; the book's "gpt2" folder).

    A relative path counts from the course's folder, not from where Jupyter started.
    """
    return Path(setting("COURSE_MODELS_DIR"))


# run_course.py's flags (and course.finetune's training ones): flag, the COURSE_*
# variable it sets, its help text
COMMAND_LINE_OPTIONS = [
    (
        "--model",
        "COURSE_MODEL",
        "gpt2-small, gpt2-medium (default), gpt2-large, gpt2-xl or offline",
    ),
    ("--judge-model", "COURSE_JUDGE_MODEL", "the Ollama model that scores the responses (llama3)"),
    ("--judge-runs", "COURSE_JUDGE_RUNS", "how often the judge scores each response set (3)"),
    ("--epochs", "COURSE_EPOCHS", "training epochs (2)"),
    ("--batch-size", "COURSE_BATCH_SIZE", "batch size (8)"),
    ("--lr", "COURSE_LR", "learning rate (5e-5)"),
    ("--weight-decay", "COURSE_WEIGHT_DECAY", "AdamW weight decay (0.1)"),
    ("--seed", "COURSE_SEED", "random seed (123)"),
    ("--device", "COURSE_DEVICE", "auto (default), cuda, mps or cpu"),
    ("--precision", "COURSE_PRECISION", "auto (default), fp32, fp16 or bf16"),
    ("--prompt-style", "COURSE_PROMPT_STYLE", "alpaca (default) or phi3"),
    ("--dataset", "COURSE_DATASET", "book (default), alpaca, or a JSON file's path or URL"),
    ("--data-limit", "COURSE_DATA_LIMIT", "use a random subset of this many entries (0: all)"),
    ("--max-length", "COURSE_MAX_LENGTH", "allowed_max_length: longer examples are cut (1024)"),
    ("--finetune", "COURSE_FINETUNE", "full (default) or lora (exercise 7.4)"),
    ("--lora-rank", "COURSE_LORA_RANK", "LoRA rank (16)"),
    ("--lora-alpha", "COURSE_LORA_ALPHA", "LoRA alpha (16)"),
    ("--stage", "COURSE_STAGE", "which model 07-09 evaluate: sft (default) or dpo (notebook 10)"),
    ("--models-dir", "COURSE_MODELS_DIR", "where GPT-2 weights are cached (gpt2/)"),
]
