"""Every file the notebooks hand on to each other: its name (after the run's "stem"), its
format, where it lives, and reading it with a message that names the notebook to run.
Used by every notebook, course.finetune and run_course.py; writes go through course.atomic_files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from course import settings
from course.atomic_files import (  # noqa: F401  (the names the course imports from here)
    STALE_AFTER_S,
    ArtifactError,
    ArtifactWriteError,
    open_atomic,
    remove_left_over_temporaries,
    torch_save,
    write_atomic,
    write_json,
    write_problem,
)

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
    "sft-gguf": "11_exporting_to_gguf_and_ollama",
    "dpo-gguf": "11_exporting_to_gguf_and_ollama",
    "modelfile": "11_exporting_to_gguf_and_ollama",
    "judge-check": "12_can_you_trust_the_judge",
}


class MissingArtifact(ArtifactError, FileNotFoundError):
    """An artifact an earlier notebook writes is not there; the message names the notebook."""


def artifacts_dir() -> Path:
    """The folder where notebooks hand results to each other (COURSE_ARTIFACTS).

    By default `artifacts/` in the course's folder; a relative COURSE_ARTIFACTS also
    counts from there, wherever Jupyter was started.
    """
    path = Path(settings.setting("COURSE_ARTIFACTS"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(
            f"The artifacts folder {path} cannot be created ({exc.strerror}). Set "
            "COURSE_ARTIFACTS to a folder you can write to."
        ) from None
    return path


# -- names ----------------------------------------------------------------------


def run_stem(
    model: str,
    dataset_tag: str = "book",
    finetune: str = "full",
    prompt_style: str | None = None,
    mask_instructions: bool | None = None,
    max_length: int | None = None,
) -> str:
    """The name every artifact of a run starts with, e.g. "gpt2-medium355M".

    Every setting that changes what notebook 05 trains is part of it: the model, the
    data (`dataset_tag`, from `settings.dataset_tag()`), the fine-tuning method, the
    prompt style, the masking of instructions and the longest example (`max_length`,
    the collate function's allowed_max_length). The book's choices (its data, full
    fine-tuning, Alpaca prompts, no masking, 1024) add nothing, so the book's runs keep
    the book's names; the others add a part each: "gpt2-medium355M-lora-phi3-masked-len512".
    `prompt_style`, `mask_instructions` and `max_length` default to COURSE_PROMPT_STYLE,
    COURSE_MASK_INSTRUCTIONS and COURSE_MAX_LENGTH.
    """
    if prompt_style is None:
        prompt_style = settings.setting("COURSE_PROMPT_STYLE")
    if mask_instructions is None:
        mask_instructions = settings.setting("COURSE_MASK_INSTRUCTIONS")
    if max_length is None:
        max_length = settings.setting("COURSE_MAX_LENGTH")
    stem = settings.model_file_stem(model)
    if dataset_tag != "book":
        stem += f"-{dataset_tag}"
    if finetune != "full":
        stem += f"-{finetune}"
    if prompt_style != "alpaca":
        stem += f"-{prompt_style}"
    if mask_instructions:
        stem += "-masked"
    if max_length != settings.SPEC["COURSE_MAX_LENGTH"][0]:
        stem += f"-len{max_length}"
    return stem


def run_variants(model: str, dataset_tag: str = "book", finetune: str = "full") -> dict:
    """The stems of every prompt style and masking of one model, data and method.

    Maps (prompt_style, mask_instructions) to the stem, the book's choice first.
    """
    return {
        (style, mask): run_stem(model, dataset_tag, finetune, style, mask)
        for style in settings.SPEC["COURSE_PROMPT_STYLE"][1]
        for mask in (False, True)
    }


def split_path(dataset_tag: str | None = None) -> Path:
    """Notebook 01's split: split.json for the book's data, split-<tag>.json otherwise."""
    tag = settings.dataset_tag() if dataset_tag is None else dataset_tag
    return artifacts_dir() / ("split.json" if tag == "book" else f"split-{tag}.json")


def judge_slug(judge_model: str) -> str:
    """A judge model's name as part of a file name: "llama3:8b" -> "llama3-8b"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", judge_model).strip("-") or "judge"


def scores_path(stem: str, judge_model: str) -> Path:
    """Notebook 09's scores of the responses of run `stem` by one judge model.

    One file per judge, so switching judges keeps the other judges' scores.
    """
    return artifacts_dir() / f"{stem}-scores-{judge_slug(judge_model)}.json"


def judge_check_path(stem: str, judge_model: str) -> Path:
    """Notebook 12's record of checking one judge model on the responses of run `stem`."""
    return artifacts_dir() / f"{stem}-judge-check-{judge_slug(judge_model)}.json"


def path_for(kind: str, stem: str) -> Path:
    """The path of artifact `kind` (a key of WRITTEN_BY, or "loss-plot") for run `stem`.

    The DPO model of notebook 10 is `path_for("dpo", stem)`; notebooks 07-09 with
    COURSE_STAGE=dpo name its responses with the stem f"{stem}-dpo". Notebook 11
    exports them as `path_for("sft-gguf", stem)` or `path_for("dpo-gguf", stem)`, with
    an Ollama Modelfile `path_for("modelfile", stem)` (stem f"{stem}-dpo" for DPO's).
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
        "sft-gguf": f"{stem}-sft.gguf",
        "dpo-gguf": f"{stem}-dpo.gguf",
        "modelfile": f"{stem}.Modelfile",
    }
    if kind == "split":
        return split_path()
    return artifacts_dir() / names[kind]


# -- writing ----------------------------------------------------------------------

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


# the end of each JSON artifact's name -> the kind of artifact (see path_for)
_JSON_KINDS = {
    "-baseline.json": "baseline",
    "-training-log.json": "training-log",
    "-instruction-data-with-response.json": "responses",
    "-responses-progress.json": "responses-progress",
    "-dpo-log.json": "dpo-log",
}


def written_by(path: str | Path) -> str | None:
    """The notebook that writes the artifact `path`, from its name (None if unknown)."""
    name = Path(path).name
    if re.fullmatch(r"split(-.+)?\.json", name):
        return WRITTEN_BY["split"]
    if re.search(r"-scores(-.+)?\.json$", name):
        return WRITTEN_BY["scores"]
    for ending, kind in _JSON_KINDS.items():
        if name.endswith(ending):
            return WRITTEN_BY[kind]
    return None


def read_json(path: str | Path, notebook: str | None = None) -> Any:
    """Read a JSON artifact; a missing or damaged file names itself and the fix.

    `notebook` is the notebook that writes the file (by default found from the file's
    name, see `written_by`). A missing file raises MissingArtifact; an empty, cut-off
    or otherwise damaged one, or one that is not UTF-8 text, an ArtifactError that
    says so. A UTF-8 byte-order mark (as some editors write) is fine.
    """
    path = Path(path)
    notebook = notebook or written_by(path)
    fix = (
        f"Delete it and run notebook {notebook} again to write it anew."
        if notebook
        else "Delete it and run the cell that writes it again."
    )
    if notebook:
        require_artifact(path, notebook)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingArtifact(f"{path.name} was not found in {path.parent}.") from None
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({exc.strerror}).") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArtifactError(
            f"{path} is damaged: it is not UTF-8 text (byte {exc.start} of {len(data)} is "
            f"0x{data[exc.start]:02x}), so not a JSON file. {fix}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.strip():
            what = "empty"
        elif not text.strip().strip("\x00"):
            what = "damaged: it holds only zero bytes (a crash while it was written)"
        elif exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
            what = f"cut off: it ends after {len(data)} bytes, in the middle of the JSON"
        else:
            what = "damaged"
        raise ArtifactError(
            f"{path} is {what} (not valid JSON: {exc.msg}, line {exc.lineno}, column "
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

    The model, dataset, fine-tuning method, prompt style and masking (COURSE_MODEL,
    COURSE_DATASET, COURSE_DATA_LIMIT, COURSE_FINETUNE, COURSE_PROMPT_STYLE,
    COURSE_MASK_INSTRUCTIONS) name the run. When the prompt style and masking are not
    set and notebook 05 trained only one of them for this model, data and method, that
    run is followed; when it trained several, the book's choice is taken if it is among
    them, else a message names the runs and the setting that chooses each. The training
    log's record of the prompt style and masking is checked against a COURSE_* variable
    that is set. Returns the model name, the stem, the followed settings and the log.
    """
    model = settings.setting("COURSE_MODEL")
    tag = settings.dataset_tag()
    finetune = settings.setting("COURSE_FINETUNE")
    stem = run_stem(model, tag, finetune)
    if not path_for("training-log", stem).exists():
        stem = _only_trained_variant(model, tag, finetune) or stem
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


def _only_trained_variant(model: str, tag: str, finetune: str) -> str | None:
    """The one trained run of this model, data and method that the settings allow, if one."""
    style_set = settings.is_set("COURSE_PROMPT_STYLE")
    mask_set = settings.is_set("COURSE_MASK_INSTRUCTIONS")
    if style_set and mask_set:
        return None
    trained = {
        (style, mask): stem
        for (style, mask), stem in run_variants(model, tag, finetune).items()
        if (not style_set or style == settings.setting("COURSE_PROMPT_STYLE"))
        and (not mask_set or mask == settings.setting("COURSE_MASK_INSTRUCTIONS"))
        and path_for("training-log", stem).exists()
    }
    if len(trained) == 1:
        return next(iter(trained.values()))
    if len(trained) > 1:
        choices = "; ".join(
            f"{stem} (COURSE_PROMPT_STYLE={style}, "
            f"COURSE_MASK_INSTRUCTIONS={'true' if mask else 'false'})"
            for (style, mask), stem in trained.items()
        )
        raise settings.SettingError(
            f"Notebook 05 trained several runs of {settings.model_file_stem(model)}: "
            f"{choices}. Set the variables of the one to use."
        )
    return None


# -- notebook 05's training log -------------------------------------------------------

TRAINING_LOG_FORMAT = "course-training-log-1"
# lists with one value per evaluation, and what else notebooks 06-09 and run_course.py read
TRAINING_LOG_SERIES = ("train_losses", "val_losses", "tokens_seen", "epochs_seen", "eval_steps")
TRAINING_LOG_KEYS = ("model", "config", "initial_losses", "duration_minutes", *TRAINING_LOG_SERIES)


def _training_log_problem(log: Any) -> str | None:
    if not isinstance(log, dict):
        return f"it holds a JSON {type(log).__name__}, not an object"
    missing = [key for key in TRAINING_LOG_KEYS if key not in log]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if not isinstance(log["config"], dict):
        return "its config is not an object"
    lengths = {key: len(log[key]) for key in TRAINING_LOG_SERIES if isinstance(log[key], list)}
    if len(lengths) < len(TRAINING_LOG_SERIES) or len(set(lengths.values())) != 1:
        return f"its per-evaluation lists differ in length ({lengths})"
    if not lengths["train_losses"]:
        return "it holds no evaluation"
    return None


def write_training_log(stem: str, log: dict) -> Path:
    """Write notebook 05's training log of run `stem` atomically; returns its path.

    `log` holds "model", "config" (what the run was trained with: prompt_style,
    mask_instructions, dataset, data_limit, finetune, lora_rank, lora_alpha and the
    hyper-parameters; notebooks 06-09 follow it through `training_run()`),
    "initial_losses", "duration_minutes" and one value per evaluation in
    "train_losses", "val_losses", "tokens_seen", "epochs_seen" and "eval_steps".
    """
    problem = _training_log_problem(log)
    if problem:
        raise ValueError(f"Not a training log: {problem}.")
    path = path_for("training-log", stem)
    write_json(path, {"format": TRAINING_LOG_FORMAT, **log})
    return path


def read_training_log(stem: str) -> dict:
    """Notebook 05's training log of run `stem`; a missing or damaged log names the fix."""
    path = path_for("training-log", stem)
    log = read_json(path, WRITTEN_BY["training-log"])
    problem = _training_log_problem(log)
    if problem:
        raise ArtifactError(
            f"{path} is not a complete training log ({problem}). Delete it and run notebook "
            f"{WRITTEN_BY['training-log']} again (it reloads a finished run without training)."
        )
    return log
