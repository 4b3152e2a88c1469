"""One fine-tuning run's files: the lock a run holds while it trains, and the backup of a
run that a run with other settings replaces (`artifacts/replaced/<stem>-<UTC time>/`).

`course.training` uses both for notebook 05 and `python -m course.finetune`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from course import artifacts
from course.artifacts import ArtifactError, ArtifactWriteError, artifacts_dir, path_for
from course.checkpoints import SETTING_VARIABLES, Words, changed_settings, recorded_settings

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # everywhere else
    msvcrt = None

REPLACED = "replaced"  # the folder inside the artifacts folder that keeps replaced runs
_WINDOWS_LOCK_OFFSET = 1 << 30  # msvcrt locks a byte far past the holder's description


class RunInProgress(ArtifactError):
    """Another process trains the same run into the same artifacts folder."""


# -- the lock -------------------------------------------------------------------------------


def lock_path(stem: str) -> Path:
    return artifacts_dir() / f"{stem}.lock"


@contextlib.contextmanager
def run_lock(stem: str, words: Words) -> Iterator[Path]:
    """Hold `<stem>.lock` while the block runs; stop if another process holds it.

    The operating system's file lock (flock; on Windows msvcrt.locking) ends with the
    process, so a killed run never leaves the run locked. The file describes its
    holder (process, host, start, command), which the second run's message names.
    """
    path = lock_path(stem)
    if fcntl is None and msvcrt is None:
        print(f"(This system has no file locks: nothing stops a second run of {stem}.)")
        yield path
        return
    fd = _acquire(path, stem, words)
    try:
        yield path
    finally:
        _release(fd, path)


def _acquire(path: Path, stem: str, words: Words) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ArtifactWriteError(artifacts.write_problem(path, exc)) from None
        try:
            _lock(fd)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
                raise
            raise RunInProgress(_locked_message(path, stem, holder, words)) from None
        try:  # the file a releasing holder removed meanwhile is not the lock any more
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": _command(),
        "interface": words.interface,
    }
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode("utf-8"))
    return fd


def _command() -> str:
    """How this process was started: "python -m course.finetune --epochs 3"."""
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        os.lseek(fd, 0, os.SEEK_SET)


def _release(fd: int, path: Path) -> None:
    """Remove the lock file while still holding it, then let go (closing unlocks)."""
    with contextlib.suppress(OSError):
        os.remove(path)  # (Windows cannot remove an open file: it stays, unlocked)
    os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _locked_message(path: Path, stem: str, holder: dict, words: Words) -> str:
    if holder:
        who = (
            f"process {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("interface") == "command line" else "")
        )
    else:
        who = "a process that has just started"
    folder = words.setting("COURSE_ARTIFACTS") if words.interface == "notebook" else "--artifacts"
    return (
        f"Another run of {stem} is training into {path.parent}: {who}. Two runs into one "
        "folder would overwrite each other's checkpoint and weights, so this one stops. "
        f"Wait until that run ends (or stop it), then {words.again}; or train this run "
        f"into another folder ({folder})."
    )


# -- the backup of a replaced run --------------------------------------------------------------

# the files of a run that depend on its training (notebook 04's baseline does not)
_KINDS = ("sft", "checkpoint", "training-log", "loss-plot", "dpo", "dpo-checkpoint", "dpo-log")
_KINDS_PER_STAGE = ("responses", "responses-progress", "modelfile")


def files_of_run(stem: str) -> list[Path]:
    """The files in the artifacts folder that the run `stem` and its later notebooks wrote."""
    paths = [path_for(kind, stem) for kind in (*_KINDS, "sft-gguf", "dpo-gguf")]
    for stage_stem in (stem, f"{stem}-dpo"):
        paths += [path_for(kind, stage_stem) for kind in _KINDS_PER_STAGE]
        pattern = glob.escape(f"{stage_stem}-scores-") + "*.json"
        paths += sorted(artifacts_dir().glob(pattern))
    return [path for path in dict.fromkeys(paths) if path.is_file()]


# the training log's name for a setting the checkpoint records (where they differ)
_LOG_NAMES = {"lr": "learning_rate"}


def settings_in_log(stem: str) -> dict | None:
    """The settings of run `stem` as its training log records them, or None."""
    try:
        log = artifacts.read_training_log(stem)
    except ArtifactError:
        return None
    config = {**log["config"], "precision": log.get("precision")}
    keys = [*SETTING_VARIABLES, "steps_per_epoch", "eval_freq", "eval_iter", "dataset"]
    return {
        key: config[_LOG_NAMES.get(key, key)]
        for key in keys
        if config.get(_LOG_NAMES.get(key, key)) is not None
    }


def replaced_run_differences(stem: str, settings: dict, force: bool) -> list[str] | None:
    """How the run saved as `stem` differs from one with `settings`: a list (empty when
    it does not), or None when nothing of it is to be set aside.

    An unfinished checkpoint (or an unreadable one) is set aside only when `force`
    says to train anew; otherwise the loop continues it or refuses it with a message.
    """
    if not files_of_run(stem):
        return None
    recorded = recorded_settings(path_for("checkpoint", stem))
    if recorded is not None and (recorded[1] or force):
        return changed_settings(recorded[0], settings)
    if path_for("checkpoint", stem).exists() and not force:
        return None  # continued, or refused with a message, by the loop
    logged = settings_in_log(stem)
    if logged is None:
        return ["the earlier run's settings cannot be read"]
    return changed_settings(logged, {key: settings.get(key) for key in logged})


def set_aside_replaced_run(stem: str, settings: dict, force: bool, words: Words) -> Path | None:
    """Move the files of the run saved as `stem` to `replaced/<stem>-<UTC time>/` when
    a run with other `settings` is about to replace them; returns that folder, or None.
    """
    changed = replaced_run_differences(stem, settings, force)
    if not changed:
        return None
    files = files_of_run(stem)
    folder = _new_backup_folder(stem)
    moved = []
    try:
        for path in files:
            os.replace(path, folder / path.name)
            moved.append(path.name)
    except OSError as exc:
        raise ArtifactWriteError(
            f"Could not move {path.name} to {folder} ({exc.strerror}); moved so far: "
            f"{', '.join(moved) or 'nothing'}. Nothing was deleted. Fix the cause and "
            f"{words.again}."
        ) from None
    print(
        f"The earlier run of {stem} had other settings ({'; '.join(changed)}). Its "
        f"files ({', '.join(moved)}) are kept in {folder}; move them back to use that run "
        "again."
    )
    return folder


def _new_backup_folder(stem: str) -> Path:
    base = artifacts_dir() / REPLACED / f"{stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for number in range(1, 1000):
        folder = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ArtifactWriteError(artifacts.write_problem(folder, exc)) from None
        return folder
    raise ArtifactError(f"Too many backups named {base.name}-* in {base.parent}.")
