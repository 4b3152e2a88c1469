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


# ---------------------------------------------------------------------------
# Exercise 7.1: the Phi-3 prompt style (notebook 01)
# ---------------------------------------------------------------------------

# Entries with and without an input, and one whose input spans two lines.
PHI3_ENTRIES = (
    {
        "instruction": "Identify the correct spelling of the following word.",
        "input": "Ocassion",
        "output": "The correct spelling is 'Occasion.'",
    },
    {
        "instruction": "What is an antonym of 'complicated'?",
        "input": "",
        "output": "An antonym of 'complicated' is 'simple'.",
    },
    {
        "instruction": "Convert 45 kilometers to meters.",
        "input": "",
        "output": "45 kilometers is 45000 meters.",
    },
    {
        "instruction": "Sort the following words alphabetically.",
        "input": "pear\napple",
        "output": "apple, pear",
    },
)


def _call(function, *args):
    """The student's function on fresh copies of `args`: ("value", v) or ("error", e)."""
    import copy

    try:
        return "value", function(*copy.deepcopy(args))
    except NotImplementedError:
        return "value", None
    except Exception as err:  # the student's code may raise anything: report it
        return "error", err


def _phi3_hint(entry: dict, expected: str, got: str) -> str:
    """What is most likely wrong with `got`, a Phi-3 prompt that differs from `expected`."""
    if "### " in got or got.startswith("Below is an instruction"):
        return (
            "that is the Alpaca template. Phi-3 has no preamble and no '###' headings: "
            "'<|user|>', a newline, the instruction."
        )
    if "<|assistant|>" in got:
        return (
            "format_input gives the prompt only; the '<|assistant|>:' line and the output "
            "belong to the response part (helpers.format_response)."
        )
    if not got.startswith("<|user|>\n"):
        return "the prompt starts with the '<|user|>' marker on a line of its own, then the instruction."
    if not entry["input"] and got.startswith(expected):
        return (
            "this entry's input is empty: add nothing after the instruction (no newline, "
            "no empty line, no input section)."
        )
    if got.rstrip("\n") == expected and got != expected:
        return (
            "no newline at the end: the response part that follows begins with its own "
            "'\\n<|assistant|>:'."
        )
    if entry["input"] and entry["input"] not in got:
        return "this entry has an input: put it on the line after the instruction."
    if entry["input"] and got.replace("\n\n", "\n") == expected:
        return "one newline between the instruction and the input, not an empty line."
    return (
        "compare expected and got character by character: '<|user|>', a newline, the "
        "instruction and, when the input is not empty, a newline and the input."
    )


def check_format_input_phi3(format_input_phi3) -> Result:
    """Exercise 7.1: `format_input_phi3(entry)` against helpers.format_input(entry, "phi3")."""
    import helpers

    what = "format_input_phi3"
    # every expected prompt first: nothing the student's code changes can alter them
    expected_prompts = [helpers.format_input(entry, "phi3") for entry in PHI3_ENTRIES]
    for number, (entry, expected) in enumerate(zip(PHI3_ENTRIES, expected_prompts, strict=True)):
        kind, got = _call(format_input_phi3, entry)
        if kind == "value" and got is None and number == 0:
            return not_attempted("7.1", what)
        if kind == "error":
            return wrong(
                "7.1",
                repr(entry),
                expected,
                f"{type(got).__name__}: {got}",
                "the function raised an error on this entry; it must accept any entry with "
                'the three fields, with "input" empty or not.',
            )
        if not isinstance(got, str):
            return wrong(
                "7.1",
                repr(entry),
                expected,
                got,
                "return the prompt as one string (a str), built from the entry's fields.",
            )
        if got != expected:
            return wrong("7.1", repr(entry), expected, got, _phi3_hint(entry, expected, got))
    with_input = sum(1 for entry in PHI3_ENTRIES if entry["input"])
    return right(
        "7.1",
        f"{len(PHI3_ENTRIES)} entries ({with_input} with an input, one of them on two lines; "
        f'{len(PHI3_ENTRIES) - with_input} without) give the very prompts of helpers.format_input(entry, "phi3").',
    )


# ---------------------------------------------------------------------------
# Exercise 7.2: masking the instruction in the collate function (notebook 02)
# ---------------------------------------------------------------------------

# A toy batch of (token_ids, prompt_length) pairs, with ids that are easy to follow:
# row 0 is the longest (no padding), rows 1 and 2 are padded.
TOY_MASKING_BATCH = (
    ([10, 11, 12, 13, 14, 15], 4),
    ([20, 21, 22], 2),
    ([30, 31, 32, 33], 3),
)

# Two real entries, tokenized as InstructionDataset(..., with_prompt_length=True) does.
REAL_MASKING_ENTRIES = PHI3_ENTRIES[:3]


def _masking_batches():
    """The batches the check collates: the toy batch, then a real Alpaca batch."""
    import helpers

    dataset = helpers.InstructionDataset(
        list(REAL_MASKING_ENTRIES), helpers.get_tokenizer(), with_prompt_length=True
    )
    real = tuple((list(ids), length) for ids, length in (dataset[i] for i in range(len(dataset))))
    return [("the toy batch", TOY_MASKING_BATCH), ("a batch of three real entries", real)]


def _ignored_positions(targets, ignore_index=-100) -> str:
    """The positions of each row that are ignore_index, as short ranges: '0-2, 5'."""
    lines = []
    for row, values in enumerate(targets.tolist()):
        positions = [i for i, value in enumerate(values) if value == ignore_index]
        ranges, start = [], None
        for i, position in enumerate(positions):
            if start is None:
                start = position
            if i + 1 == len(positions) or positions[i + 1] != position + 1:
                ranges.append(str(start) if start == position else f"{start}-{position}")
                start = None
        lines.append(f"row {row}: {', '.join(ranges) or 'none'}")
    return "; ".join(lines)


def _masking_hint(row_item, position: int, expected: int, got: int, plain_target: int) -> str:
    """Why target `position` of a row is wrong, given the row's (token_ids, prompt_length)."""
    token_ids, prompt_length = row_item
    last_prompt_target = prompt_length - 2  # targets 0..prompt_length-2 are prompt tokens
    if position == prompt_length - 1 and got == -100:
        return (
            "off by one: the targets are the inputs shifted by one, so target position i "
            "holds token i + 1. Mask the first prompt_length - 1 targets; target "
            "prompt_length - 1 is the first token of the response and must count."
        )
    if position <= last_prompt_target and expected == -100 and got == plain_target:
        if position == last_prompt_target:
            return (
                "off by one: target position i holds token i + 1, so the prompt's last token "
                "sits at target prompt_length - 2. Mask the first prompt_length - 1 targets."
            )
        return (
            "this target is a prompt token and must be -100: in each row, set the first "
            "prompt_length - 1 targets to ignore_index."
        )
    if position == len(token_ids) - 1 and got == -100:
        return (
            "this is the row's first <|endoftext|> target: keep it (it teaches the model to "
            "stop); only the padding after it becomes -100."
        )
    if position >= len(token_ids) and expected == -100:
        return (
            "padding beyond the row's first <|endoftext|> target must be -100 as in draft 3: "
            "from target position len(token_ids) on."
        )
    if got == -100:
        return "this target is a response token: it must count, not be -100."
    return (
        "the targets are the inputs shifted by one position (draft 2), with the first "
        "<|endoftext|> of each row kept."
    )


def check_instruction_masking(collate) -> Result:
    """Exercise 7.2: `collate(batch)` on (token_ids, prompt_length) items.

    Expected: helpers.custom_collate_fn(batch, mask_instructions=True): the inputs of
    draft 3, and targets with the padding after the first <|endoftext|> and the first
    prompt_length - 1 targets of every row set to -100.
    """
    import torch

    import helpers

    what = "custom_collate_with_masking"
    checked = []
    # every expected tensor first: nothing the student's code changes can alter them
    cases = []
    for name, batch in _masking_batches():
        items = [(list(ids), length) for ids, length in batch]
        expected = helpers.custom_collate_fn(items, mask_instructions=True)
        plain = helpers.custom_collate_fn([ids for ids, _ in items])
        cases.append((name, items, *expected, plain[1]))
    for number, (name, items, expected_inputs, expected_targets, plain_targets) in enumerate(cases):
        shown = repr(items) if number == 0 else f"{name} (prompt lengths {[n for _, n in items]})"
        kind, got = _call(collate, items)
        if kind == "value" and got is None and number == 0:
            return not_attempted("7.2", what)
        if kind == "error":
            return wrong(
                "7.2",
                shown,
                "(inputs, targets)",
                f"{type(got).__name__}: {got}",
                "the function raised an error; its batch is a list of (token_ids, "
                "prompt_length) pairs.",
            )
        if not (
            isinstance(got, tuple | list)
            and len(got) == 2
            and all(isinstance(t, torch.Tensor) for t in got)
        ):
            return wrong(
                "7.2",
                shown,
                "a pair of tensors (inputs, targets)",
                got,
                "return two tensors, as draft 3 does: torch.stack(inputs), torch.stack(targets).",
            )
        inputs, targets = (t.detach().cpu() for t in got)
        for label, want, have in (
            ("inputs", expected_inputs, inputs),
            ("targets", expected_targets, targets),
        ):
            if tuple(have.shape) != tuple(want.shape):
                return wrong(
                    "7.2",
                    f"{shown}, the shape of the {label}",
                    tuple(want.shape),
                    tuple(have.shape),
                    "pad every row to the longest item + 1, then drop one position: "
                    "(rows, longest item) for both tensors.",
                )
        if not torch.equal(inputs, expected_inputs):
            row, position = (inputs != expected_inputs).nonzero()[0].tolist()
            return wrong(
                "7.2",
                f"{shown}, inputs row {row}, position {position}",
                expected_inputs[row, position].item(),
                inputs[row, position].item(),
                "masking changes only the targets: the inputs are draft 3's, the padded "
                "tokens without the last position.",
            )
        if not torch.equal(targets, expected_targets):
            row, position = (targets != expected_targets).nonzero()[0].tolist()
            expected, have = expected_targets[row, position].item(), targets[row, position].item()
            hint = _masking_hint(
                items[row], position, expected, have, plain_targets[row, position].item()
            )
            return wrong(
                "7.2",
                f"{shown}, targets row {row} (prompt_length {items[row][1]}), position {position}",
                expected,
                have,
                hint + f" The -100 positions should be: {_ignored_positions(expected_targets)}.",
            )
        checked.append(f"{name} (-100 at {_ignored_positions(expected_targets)})")
    return right(
        "7.2",
        "The inputs and targets equal helpers.custom_collate_fn(batch, mask_instructions=True) on "
        + " and on ".join(checked)
        + ".",
    )
