"""Running one notebook top to bottom in a fresh kernel, and saying how it went.

Used by run_course.py for each notebook of the course (and by its tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from course import settings


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
            f"    python run_course.py --from {self.name[:2]}"
        )


class KernelWatch:
    """The running cell and the kernel process of one notebook's run; Ctrl+C handling."""

    def __init__(self) -> None:
        self.client: NotebookClient | None = None
        self.index: int | None = None
        self.process = None
        self.interrupted: list[bool] = []

    def kernel_process(self):
        return getattr(getattr(self.client.km, "provisioner", None), "process", None)

    def on_sigint(self) -> None:
        """Ctrl+C: interrupt the running cell, as Jupyter's stop button does."""
        self.interrupted.append(True)
        process = self.kernel_process()
        if process is not None:  # pressed again: the kernel does not react, stop it
            with contextlib.suppress(OSError):
                sig = signal.SIGINT if len(self.interrupted) == 1 else signal.SIGKILL
                os.kill(process.pid, sig)

    def on_cell_start(self, cell, cell_index, **_) -> None:
        self.index = cell_index
        # the kernel process: how it ended tells a crash from being killed for memory
        self.process = self.kernel_process() or self.process
        # nbclient's own SIGINT handler shuts the kernel down under the running cell, which
        # ends in an empty AssertionError; this one interrupts the cell instead
        with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.on_sigint)


def cleared(path: Path):
    """The notebook with its stored outputs cleared."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def record_failure(result: NotebookRun, exc: Exception, nb, watch: KernelWatch) -> None:
    """The failed cell and the error into `result`."""
    result.ok = False
    result.ename = getattr(exc, "ename", None) or type(exc).__name__
    text = str(exc).strip()
    result.evalue = getattr(exc, "evalue", None) or (text.splitlines()[-1] if text else "")
    if watch.process is not None and result.ename == "DeadKernelError":
        with contextlib.suppress(Exception):
            result.kernel_exit = watch.process.wait(timeout=5)
    if watch.index is not None:
        result.cell_index = watch.index
        source = nb.cells[watch.index].source.strip()
        result.cell_first_line = source.splitlines()[0] if source else "(empty cell)"


def save_executed(nb, executed: Path) -> None:
    """The executed copy, or none at all (no half-written copy left behind)."""
    try:
        nbformat.write(nb, executed)
    except BaseException:
        with contextlib.suppress(OSError):
            executed.unlink()
        raise


def run_notebook(
    path: Path,
    executed_dir: Path,
    env: dict[str, str],
    cwd: Path = settings.ROOT,
    timeout: int | None = None,
    kernel_name: str = "python3",
) -> NotebookRun:
    """Execute one notebook top to bottom in a fresh kernel; save the executed copy.

    The stored outputs are cleared first, so the executed copy of a notebook that
    failed shows only what this run printed. Ctrl+C interrupts the kernel and ends
    with `result.interrupted`.
    """
    nb = cleared(path)
    watch = KernelWatch()
    client = watch.client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(cwd)}},
        on_cell_start=watch.on_cell_start,
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
        watch.interrupted.append(True)
        process = watch.kernel_process()
        if process is not None and process.poll() is None:
            process.kill()  # nbclient had no time to shut it down
    except Exception as exc:  # CellExecutionError, CellTimeoutError, DeadKernelError, ...
        record_failure(result, exc, nb, watch)
    finally:
        result.seconds = time.perf_counter() - start
        # Ctrl+C before the first cell reaches nbclient's handler, which leaves this behind
        stopped = getattr(client, "_async_cleanup_kernel_future", None) is not None
        result.interrupted = bool(watch.interrupted) or stopped
        kernel_log.close()
        save_executed(nb, executed)
    return result
