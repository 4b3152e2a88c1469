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

from .lora import GPT2_MEDIUM_LORA_PARAMETERS, TINY_GPT_CONFIG, check_lora
from .masking import check_instruction_masking
from .prompt_style import PHI3_ENTRIES, check_format_input_phi3
from .results import NOT_ATTEMPTED, Result, not_attempted, right, wrong

__all__ = [
    "GPT2_MEDIUM_LORA_PARAMETERS",
    "NOT_ATTEMPTED",
    "PHI3_ENTRIES",
    "TINY_GPT_CONFIG",
    "Result",
    "check_format_input_phi3",
    "check_instruction_masking",
    "check_lora",
    "not_attempted",
    "right",
    "wrong",
]
