"""Every file the notebooks hand on to each other: its name, its format, how it is written.

This module is the one place that knows where an artifact lives and how it is read
and written. Writes are atomic (a unique temporary file, fsync, rename), so an
interruption leaves the old file or the new one, never half of one; reads name the
file, what is wrong with it and which notebook writes it anew.

The artifacts of a run are named after its "stem": the model (the book's naming,
"gpt2-medium355M"), followed by the dataset and the fine-tuning method where they
are not the book's, so runs with other settings never overwrite each other.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from course import settings

# which notebook writes each artifact (the fix when one is missing or damaged)
WRITTEN_BY = {
    "split": "01_dataset_download_and_formatting",
    "baseline": "04_loading_a_pretrained_llm",
    "sft": "05_instruction_finetuning",
    "checkpoint": "05_instruction_finetuning",
    "training-log": "05_instruction_finetuning",
    "responses": "07_extracting_responses",
    "responses-progress": "07_extracting_responses",
    "scores": "09_scoring_the_responses",
    "dpo": "10_preference_tuning_with_dpo",
    "dpo-checkpoint": "10_preference_tuning_with_dpo",
    "dpo-log": "10_preference_tuning_with_dpo",
}


class ArtifactError(RuntimeError):
    """An artifact is damaged or cannot be written; the message says what to do."""


class MissingArtifact(ArtifactError, FileNotFoundError):
    """An artifact an earlier notebook writes is not there; the message names the notebook."""


def artifacts_dir() -> Path:
    """The folder where notebooks hand results to each other (COURSE_ARTIFACTS)."""
    path = Path(os.environ.get("COURSE_ARTIFACTS") or settings.ROOT / "artifacts")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(
            f"The artifacts folder {path} cannot be created ({exc.strerror}). Set "
            "COURSE_ARTIFACTS to a folder you can write to."
        ) from None
    return path


# -- names ----------------------------------------------------------------------


def run_stem(model: str, dataset_tag: str = "book", finetune: str = "full") -> str:
    """The name every artifact of a run starts with, e.g. "gpt2-medium355M".

    `dataset_tag` comes from `settings.dataset_tag()`; the book's data and full
    fine-tuning add nothing, so the book's runs keep the book's names.
    """
    stem = settings.model_file_stem(model)
    if dataset_tag != "book":
        stem += f"-{dataset_tag}"
    if finetune != "full":
        stem += f"-{finetune}"
    return stem


def split_path(dataset_tag: str | None = None) -> Path:
    """Notebook 01's split: split.json for the book's data, split-<tag>.json otherwise."""
    tag = settings.dataset_tag() if dataset_tag is None else dataset_tag
    return artifacts_dir() / ("split.json" if tag == "book" else f"split-{tag}.json")


def judge_slug(judge_model: str) -> str:
    """A judge model's name as part of a file name: "llama3:8b" -> "llama3-8b"."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", judge_model).strip("-") or "judge"


def scores_path(stem: str, judge_model: str) -> Path:
    """Notebook 09's scores of the responses of run `stem` by one judge model.

    One file per judge, so switching judges keeps the other judges' scores.
    """
    return artifacts_dir() / f"{stem}-scores-{judge_slug(judge_model)}.json"


def path_for(kind: str, stem: str) -> Path:
    """The path of artifact `kind` (a key of WRITTEN_BY, or "loss-plot") for run `stem`.

    The DPO model of notebook 10 is `path_for("dpo", stem)`; notebooks 07-09 with
    COURSE_STAGE=dpo name its responses with the stem f"{stem}-dpo".
    """
    names = {
        "baseline": f"{stem}-baseline.json",
        "sft": f"{stem}-sft.pth",
        "dpo": f"{stem}-dpo.pth",
        "dpo-checkpoint": f"{stem}-dpo-checkpoint.pth",
        "dpo-log": f"{stem}-dpo-log.json",
        "checkpoint": f"{stem}-train-checkpoint.pth",
        "training-log": f"{stem}-training-log.json",
        "loss-plot": f"{stem}-loss-plot.pdf",
        "responses": f"{stem}-instruction-data-with-response.json",
        "responses-progress": f"{stem}-responses-progress.json",
    }
    if kind == "split":
        return split_path()
    return artifacts_dir() / names[kind]


# -- writing ----------------------------------------------------------------------


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file of its own and a rename.

    A full or read-only disk gives an ArtifactError that says so, and leaves no
    temporary file behind.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise ArtifactError(_write_problem(path, exc)) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_problem(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return (
            f"Could not write {path.name}: the disk is full. Nothing was changed. Free some "
            f"space in {path.parent} (or set COURSE_ARTIFACTS to a folder on another disk) "
            "and run the cell again."
        )
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return (
            f"Could not write {path.name}: {path.parent} is not writable ({exc.strerror}). "
            "Set COURSE_ARTIFACTS to a folder you can write to and run the cell again."
        )
    return f"Could not write {path}: {exc.strerror or exc}."


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented UTF-8 JSON, atomically."""
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save`, atomically (the same guarantees as `write_atomic`)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


# -- reading ----------------------------------------------------------------------


def require_artifact(path: str | Path, notebook: str) -> Path:
    """Stop with a clear message when an earlier notebook's output is missing."""
    path = Path(path)
    if not path.exists():
        raise MissingArtifact(
            f"{path.name} was not found in {path.parent}. It is written by notebook "
            f"{notebook}: run that notebook first (with the same COURSE_* settings)."
        )
    return path


def read_json(path: str | Path, notebook: str | None = None) -> Any:
    """Read a JSON artifact; a missing or damaged file names itself and the fix.

    `notebook` is the notebook that writes the file. A UTF-8 byte-order mark is fine.
    """
    path = Path(path)
    fix = (
        f"Delete it and run notebook {notebook} again to write it anew."
        if notebook
        else "Delete it and run the cell again."
    )
    if notebook:
        require_artifact(path, notebook)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArtifactError(
            f"{path} is not a text file (byte {exc.start} is not UTF-8): it is damaged. {fix}"
        ) from None
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({exc.strerror}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = (
            "empty"
            if not text.strip()
            else "cut off"
            if exc.pos >= len(text.rstrip())
            else "damaged"
        )
        raise ArtifactError(
            f"{path} is {what}: not valid JSON ({exc.msg}, line {exc.lineno}, column "
            f"{exc.colno}). {fix}"
        ) from None


def sha256_of_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- what notebook 05 trained with ----------------------------------------------------

# what notebook 05 records in its training log ("config") and notebooks 06-09 follow
FOLLOWED = {
    "COURSE_PROMPT_STYLE": "prompt_style",
    "COURSE_MASK_INSTRUCTIONS": "mask_instructions",
}


def training_run() -> dict:
    """The run notebook 05 trained, for notebooks 06-09 to follow.

    The model, dataset and fine-tuning method (COURSE_MODEL, COURSE_DATASET,
    COURSE_DATA_LIMIT, COURSE_FINETUNE) name the run; its training log says which prompt
    style and masking it used. Those are taken from the log; a COURSE_* variable that
    is set to another value stops with a message naming both. Returns the model name,
    the stem, the followed settings and the log itself.
    """
    model = settings.setting("COURSE_MODEL")
    tag = settings.dataset_tag()
    finetune = settings.setting("COURSE_FINETUNE")
    stem = run_stem(model, tag, finetune)
    log = read_json(path_for("training-log", stem), WRITTEN_BY["training-log"])
    config = log.get("config", {}) if isinstance(log, dict) else {}
    run = {"model": model, "stem": stem, "dataset_tag": tag, "finetune": finetune, "log": log}
    for name, key in FOLLOWED.items():
        recorded = config.get(key, settings.SPEC[name][0])
        if settings.is_set(name) and settings.setting(name) != recorded:
            raise settings.SettingError(
                f"{name}={settings.setting(name)!r}, but notebook 05 trained {stem} with "
                f"{key} {recorded!r}. Unset {name} to follow the training run, or run "
                f"notebook 05 again with {name}={settings.setting(name)!r}."
            )
        run[key] = recorded
    return run
