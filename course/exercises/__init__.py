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
"wrong" or "right", for tests and for `run_course.py`. Once a check says right, the
notebook goes on with the student's code (`choose`, `phi3_style`), else with the
course's solution, and its output says whose code ran.
"""

from .lora import GPT2_MEDIUM_LORA_PARAMETERS, TINY_GPT_CONFIG, check_lora
from .masking import check_instruction_masking
from .prompt_style import PHI3_ENTRIES, Phi3Style, check_phi3_style, phi3_style
from .results import NOT_ATTEMPTED, Choice, Result, choose, not_attempted, right, wrong

__all__ = [
    "GPT2_MEDIUM_LORA_PARAMETERS",
    "NOT_ATTEMPTED",
    "PHI3_ENTRIES",
    "TINY_GPT_CONFIG",
    "Choice",
    "Phi3Style",
    "Result",
    "check_instruction_masking",
    "check_lora",
    "check_phi3_style",
    "choose",
    "not_attempted",
    "phi3_style",
    "right",
    "wrong",
]
