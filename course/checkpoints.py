"""A resumable run's checkpoint file, and the words its messages use.

`course.resumable` (notebooks 05 and 10, `python -m course.finetune`) saves and reads
checkpoints here; messages name the notebook's cells or the command's own flags.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from course.artifacts import torch_save
from course.settings import COMMAND_LINE_OPTIONS
from course.weights import load_state_dict_checked, read_pth

CHECKPOINT_FORMAT = "course-training-checkpoint-1"

# a run's settings (see course.resumable.run_settings) -> the variable that sets it
SETTING_VARIABLES = {
    "num_epochs": "COURSE_EPOCHS",
    "lr": "COURSE_LR",
    "weight_decay": "COURSE_WEIGHT_DECAY",
    "batch_size": "COURSE_BATCH_SIZE",
    "seed": "COURSE_SEED",
    "precision": "COURSE_PRECISION",
    "lora_rank": "COURSE_LORA_RANK",
    "lora_alpha": "COURSE_LORA_ALPHA",
    "data_limit": "COURSE_DATA_LIMIT",
    "prompt_style": "COURSE_PROMPT_STYLE",
    "mask_instructions": "COURSE_MASK_INSTRUCTIONS",
    "finetune": "COURSE_FINETUNE",
    "model": "COURSE_MODEL",
}
_FLAGS = {name: flag for flag, name, _ in COMMAND_LINE_OPTIONS}
_FLAGS["COURSE_MASK_INSTRUCTIONS"] = "--mask-instructions"


@dataclass(frozen=True)
class Words:
    """How a message tells the student to act: in a notebook, or on the command line."""

    interface: str  # "notebook" or "command line"

    @property
    def again(self) -> str:
        if self.interface == "notebook":
            return "run the cell again"
        return "run the same command again"

    @property
    def retrain(self) -> str:
        if self.interface == "notebook":
            return "set COURSE_RETRAIN=1 (force=True)"
        return "add --retrain"

    @property
    def starts_anew(self) -> str:
        if self.interface == "notebook":
            return "the training cell then starts from the beginning"
        return "the same command then starts from the beginning"

    def setting(self, variable: str, value=None) -> str:
        """COURSE_LR / COURSE_LR=0.001 in a notebook, --lr / --lr 0.001 on the command line."""
        flag = _FLAGS.get(variable) if self.interface == "command line" else None
        if flag is None:
            return variable if value is None else f"{variable}={value}"
        if value is None or flag == "--mask-instructions":
            return flag
        return f"{flag} {value}"


INTERFACES = ("notebook", "command line")


def sentence(text: str) -> str:
    """`text` with a capital first letter, as a sentence's start (the rest unchanged)."""
    return text[:1].upper() + text[1:]


def words_for(interface: str) -> Words:
    """The Words of `interface` ("notebook" or "command line"); another value is an error."""
    if interface not in INTERFACES:
        raise ValueError(f"interface={interface!r}: use 'notebook' or 'command line'.")
    return Words(interface)


def get_rng_states(data_loader=None) -> dict:
    """The state of every random number generator training draws from.

    PyTorch's (the shuffled order of each epoch, dropout), the GPU's, NumPy's and
    Python's, and the data loader's own generator if it has one.
    """
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            *numpy_state[2:],
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    if data_loader is not None and getattr(data_loader, "generator", None) is not None:
        states["loader"] = data_loader.generator.get_state()
    return states


def set_rng_states(states: dict, data_loader=None) -> None:
    """Put the random number generators back into the states `get_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])
    if "loader" in states and getattr(data_loader, "generator", None) is not None:
        data_loader.generator.set_state(states["loader"])


def save_training_checkpoint(
    path, model, optimizer, scaler, task, settings, progress, rng, epoch_rng
):
    """Write everything `run_resumable` needs to continue, atomically.

    `epoch_rng` is the generators' state just before the current epoch's shuffle (None
    between epochs); `rng` their state now. A finished run keeps only the weights and
    the history: it is never continued, and the optimizer's state is twice the model.
    """
    finished = progress["finished"]
    checkpoint = {
        "format": task.checkpoint_format,
        "settings": settings,
        "progress": progress,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": None if finished else optimizer.state_dict(),
        "scaler_state_dict": None if finished or scaler is None else scaler.state_dict(),
        "rng": None if finished else rng,
        "epoch_rng": None if finished else epoch_rng,
    }
    torch_save(checkpoint, path)


def changed_settings(saved: dict, now: dict) -> list[str]:
    """ "lr 0.001 then, 0.002 now" for each setting that differs (keys of either side)."""
    return [
        f"{key} {saved.get(key)!r} then, {now.get(key)!r} now"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def how_to_go_back(saved: dict, now: dict, words: Words) -> str:
    """ "COURSE_LR=0.001" / "--lr 0.001" for the changed settings a variable sets."""
    back = [
        words.setting(SETTING_VARIABLES[key], saved.get(key))
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key) and key in SETTING_VARIABLES
    ]
    return f" ({', '.join(back)})" if back else ""


def load_training_checkpoint(
    path, model, optimizer, scaler, task, settings, interface: str = "notebook"
) -> dict | None:
    """Read a checkpoint of `run_resumable` into `model`, `optimizer` and `scaler`.

    Returns the checkpoint, or None when it holds a finished run with other settings
    (a new run may replace it). Stops with a clear message when the file is damaged,
    is not such a checkpoint, or holds an unfinished run with other settings
    (continuing it would mix two runs); the message speaks to `interface`.
    """
    path, words = Path(path), words_for(interface)
    start_over = f"Delete it ({words.starts_anew}) or {words.retrain} to train anew"
    try:
        checkpoint = read_pth(path, task.notebook)
    except RuntimeError as exc:  # damaged: the notebook's fix is the notebook's words
        if words.interface == "notebook":
            raise
        first = str(exc).split(" Delete it and run notebook")[0]
        raise RuntimeError(f"{first} {start_over}.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != task.checkpoint_format:
        raise ValueError(f"{path} is not a {task.name} checkpoint of this course. {start_over}.")
    saved = checkpoint["settings"]
    changed = changed_settings(saved, settings)
    if changed and checkpoint["progress"]["finished"]:
        print(f"{path.name} holds a finished run with other settings ({'; '.join(changed)}).")
        return None
    if changed:
        raise ValueError(
            f"{path} holds an unfinished {task.name} run with other settings "
            f"({'; '.join(changed)}), and continuing it would mix two runs. {start_over}, "
            f"or change the settings back{how_to_go_back(saved, settings, words)} and "
            f"{words.again} to continue it."
        )
    load_state_dict_checked(model, checkpoint["model_state_dict"], str(path))
    if not checkpoint["progress"]["finished"]:
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"The optimizer state in {path} does not fit this optimizer ({exc}). {start_over}."
            ) from None
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler_state_dict"])
    return checkpoint


def recorded_settings(path) -> tuple[dict, bool] | None:
    """The settings a checkpoint was saved with and whether its run finished, or None
    when the file cannot be read as such a checkpoint. Reads the tensors lazily (mmap)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        settings, finished = checkpoint["settings"], checkpoint["progress"]["finished"]
    except Exception:  # damaged, not a checkpoint: the caller treats it as unknown
        return None
    return (settings, bool(finished)) if isinstance(settings, dict) else None
