"""What a check reports, and how it runs the student's code without ever raising.

Shared by the checks of exercises 7.1, 7.2 and 7.4 (notebooks 01, 02 and 05).
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_ATTEMPTED = "not attempted yet"


@dataclass(frozen=True)
class Result:
    """What a check found: status ("not attempted", "wrong" or "right") and a message."""

    exercise: str
    status: str
    message: str

    def __str__(self) -> str:
        return f"Exercise {self.exercise}: {self.message}"

    def __repr__(self) -> str:  # the notebook shows the message when the cell ends on it
        return str(self)


def not_attempted(exercise: str, what: str) -> Result:
    """The scaffold is untouched: say so and what to write."""
    return Result(
        exercise, "not attempted", f"{NOT_ATTEMPTED}. Write {what} above, then run this cell again."
    )


def wrong(exercise: str, what: str, expected, got, hint: str) -> Result:
    """The first concrete difference: the input, what was expected and what came back."""
    message = (
        f"not right yet.\n  input:    {what}\n  expected: {expected!r}\n  got:      {got!r}\n"
        f"  hint:     {hint}"
    )
    return Result(exercise, "wrong", message)


def right(exercise: str, checked: str) -> Result:
    """Every case passed: say what was checked."""
    return Result(exercise, "right", f"right. {checked}")


CALL_SECONDS = 20  # the longest a student's function may run inside a check


class _TimeLimit(Exception):
    """Raised inside the student's code when it runs past the check's time limit."""


def call(function, *args, seconds: float = CALL_SECONDS):
    """The student's function on fresh copies of `args`: ("value", v) or ("error", e).

    It never raises: an exception, `exit()` or a call that runs past `seconds` (an
    endless loop) comes back as ("error", e), with a TimeoutError for the last.
    NotImplementedError (the untouched scaffold) comes back as ("value", None).
    """
    import copy

    args = copy.deepcopy(args)
    try:
        return "value", _within(seconds, function, args)
    except NotImplementedError:
        return "value", None
    except _TimeLimit:
        return "error", TimeoutError(
            f"it did not return within {seconds:g} s: is there a loop that never ends?"
        )
    except (Exception, SystemExit) as err:  # the student's code may raise anything
        return "error", err


def _within(seconds: float, function, args):
    """function(*args), stopped by a timer signal after `seconds` where one can be used."""
    import signal
    import threading

    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:  # no timer signal here (Windows, or a thread): a thread that we wait for
        return _in_thread(seconds, function, args)

    def stop(signum, frame):
        raise _TimeLimit

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_thread(seconds: float, function, args):
    """function(*args) in a daemon thread; _TimeLimit if it is still running after `seconds`."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except BaseException as err:  # handed back to the caller below
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _TimeLimit
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
