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


def describe_error(error: BaseException) -> str:
    """An exception as one line for a check's message: 'TypeError: ...'."""
    return f"{type(error).__name__}: {error}"


def unchanged(after, before) -> bool:
    """Whether the copy a student's function was given still equals the original."""
    try:
        return bool(after == before)
    except Exception:  # the function put something in it that cannot be compared
        return False


@dataclass(frozen=True)
class Choice:
    """What runs after a check: the student's code once it is right, else the course's.

    `code` is what the following cells call; `by` says whose it is, for their output
    ("your format_input_phi3" or "the course's solution, helpers.format_input").
    """

    code: object
    yours: bool
    by: str


def choose(result: Result, yours, solution, your_name: str, solution_name: str) -> Choice:
    """The student's `yours` when `result` says right, else the course's `solution`."""
    if result.status == "right":
        return Choice(yours, True, f"your {your_name}")
    state = {"not attempted": NOT_ATTEMPTED, "wrong": "not right yet"}.get(result.status)
    return Choice(
        solution,
        False,
        f"the course's solution, {solution_name} (exercise {result.exercise}: {state})",
    )


class _TimeLimit(Exception):
    """Raised inside the student's code when it runs past the check's time limit."""


def call(function, *args, seconds: float | None = None):
    """The student's function on fresh copies of `args`: ("value", v) or ("error", e).

    It never raises: an exception, `exit()` or a call that runs past `seconds` (an
    endless loop) comes back as ("error", e), with a TimeoutError for the last.
    NotImplementedError (the untouched scaffold) comes back as ("value", None).
    """
    kind, value, _ = call_with_copies(function, *args, seconds=seconds)
    return kind, value


def call_with_copies(function, *args, seconds: float | None = None, **kwargs):
    """Like `call` (keyword arguments too), and also the copies the function was given.

    A check compares the copies with the originals afterwards: a function that changes
    the caller's data (pads the dataset's own lists, rewrites an entry) shows up there.
    """
    import copy

    args, kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)
    seconds = CALL_SECONDS if seconds is None else seconds  # read now: tests shorten it
    try:
        return "value", _within(seconds, function, args, kwargs), args
    except NotImplementedError:
        return "value", None, args
    except _TimeLimit:
        error = TimeoutError(
            f"it did not return within {seconds:g} s: is there a loop that never ends?"
        )
        return "error", error, args
    except (Exception, SystemExit) as err:  # the student's code may raise anything
        return "error", err, args


def _within(seconds: float, function, args, kwargs):
    """function(*args, **kwargs), stopped by a timer signal after `seconds` where one can be used."""
    import signal
    import threading

    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:  # no timer signal here (Windows, or a thread): a thread that we wait for
        return _in_thread(seconds, function, args, kwargs)

    def stop(signum, frame):
        raise _TimeLimit

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_thread(seconds: float, function, args, kwargs):
    """function(*args, **kwargs) in a daemon thread; _TimeLimit if it is still running after `seconds`."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args, **kwargs)
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
