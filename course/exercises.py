"""Checks for the exercises a student writes (7.1, 7.2, 7.4).

Each notebook that teaches an exercise has a scaffold cell (the function's signature
and `# your code here`), a check cell that calls one of the `check_*` functions below
with the student's code, and a folded solution. A check runs the student's code on
concrete inputs against the book's behaviour (the course's own solution in
`helpers.py`) and returns a `Result`:

- `not attempted yet` while the scaffold is untouched (it returns None or raises
  NotImplementedError), so a notebook still runs to the end before the student writes
  anything;
- the first concrete difference (the input, what was expected, what came back) and a
  hint, when the code is wrong;
- what was checked, when it is right.

Printing a `Result` shows that message; `result.status` is "not attempted",
"wrong" or "right", for tests and for `run_course.py`.
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
