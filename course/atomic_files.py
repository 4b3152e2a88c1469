"""Writing a file so that an interruption never leaves half of it: a unique temporary file,
fsync, rename, and the clean-up of a killed write's leftovers. `course.artifacts` (every
artifact of the notebooks), `course.run_files` and `course.gguf_file` write through it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


class ArtifactError(RuntimeError):
    """An artifact is damaged or cannot be written; the message says what to do."""


class ArtifactWriteError(ArtifactError, OSError):
    """An artifact could not be written (a full or read-only disk); nothing was changed."""


# the temporary file of one write: "<name>.<host>-<pid>-<random>.tmp" beside the target
_TMP_PATTERN = r"\.(?P<host>[A-Za-z0-9_-]*)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp"
_HOST = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())[:32]
STALE_AFTER_S = 24 * 3600  # another machine's temporary files count as left over after this


@contextlib.contextmanager
def open_atomic(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only when the `with` block completes.

    The bytes go to a temporary file of this writer's own beside `path`; it is flushed
    to disk (fsync) and renamed to `path`. An error or interruption leaves the old file
    as it was and removes the temporary file; so does a full or read-only disk, which
    raises an ArtifactWriteError (an ArtifactError and an OSError) that says what to do. Two processes writing the same file
    at once both succeed, and the file is one of the two, whole. Temporary files left
    by a process that was killed while writing are removed by the next write.

        with open_atomic(path) as f:
            fig.savefig(f, format="pdf")
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_left_over_temporaries(path)
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        _remove_quietly(tmp)
        os_error = _os_error_in(exc) if isinstance(exc, Exception) else None
        if os_error is not None:
            raise ArtifactWriteError(write_problem(path, os_error)) from None
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `open_atomic`)."""
    with open_atomic(path) as f:
        f.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented UTF-8 JSON, atomically."""
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically (the guarantees of `open_atomic`).

    It streams to the temporary file, so a large checkpoint needs no second copy in
    memory.
    """
    import torch

    with open_atomic(path) as f:
        torch.save(obj, f)


def remove_left_over_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files of writes of `path` whose process no longer runs.

    A write killed half-way (kill -9, a crash, a power cut) leaves its temporary file;
    the next write of the same artifact calls this. The temporary files of writers
    that still run are kept; those of another machine (a shared folder) after a day.
    Returns what was removed.
    """
    path = Path(path)
    removed = []
    pattern = re.compile(re.escape(path.name) + _TMP_PATTERN)
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        # "<name>.tmp" was the temporary file of earlier versions of the course
        if match is None and candidate.name != f"{path.name}.tmp":
            continue
        if match is not None and match["host"] == _HOST and os.name != "nt":
            left_over = not _process_runs(int(match["pid"]))
        else:
            try:
                age = time.time() - candidate.stat().st_mtime
            except OSError:
                continue
            left_over = match is None or age > STALE_AFTER_S
        if left_over and _remove_quietly(candidate):
            removed.append(candidate)
    return removed


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, but belongs to someone else
    return True


def _remove_quietly(path: Path) -> bool:
    try:
        os.remove(path)
    except OSError:
        return False
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; not every system can open a folder for this."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`, if any (torch.save reports one as a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_problem(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (
            f"Could not write {path.name}: the disk is full ({exc.strerror}). Nothing was "
            f"changed and no partial file was left. Free some space in {path.parent} (or "
            "set COURSE_ARTIFACTS to a folder on another disk) and run the cell again."
        )
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return (
            f"Could not write {path.name}: {path.parent} is not writable ({exc.strerror}). "
            "Set COURSE_ARTIFACTS to a folder you can write to and run the cell again."
        )
    return (
        f"Could not write {path} ({exc.strerror or exc}). Nothing was changed; fix the "
        "cause and run the cell again."
    )
