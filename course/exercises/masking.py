"""Exercise 7.2: the check of the student's instruction-masking collate function (notebook 02).

The batches hold `(instruction_length, token_ids)` items, the book's order; the expected
tensors are helpers.custom_collate_fn(batch, mask_instructions=True)'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .prompt_style import PHI3_ENTRIES
from .results import (
    Result,
    call_with_copies,
    describe_error,
    not_attempted,
    right,
    unchanged,
    wrong,
)

# row 0 is the longest (no padding), rows 1 and 2 are padded.
TOY_MASKING_BATCH = (
    (4, [10, 11, 12, 13, 14, 15]),
    (2, [20, 21, 22]),
    (3, [30, 31, 32, 33]),
)

# Three real entries, tokenized as InstructionDataset(..., with_instruction_length=True) does.
REAL_MASKING_ENTRIES = PHI3_ENTRIES[:3]

WHAT = "custom_collate_with_masking"
BATCH_ITEMS = (
    "its batch is a list of (instruction_length, token_ids) pairs, as "
    "InstructionDataset(..., with_instruction_length=True) hands them out."
)
LONGEST_NOT_FIRST = (
    "in this batch the longest row is not the first: take the width from every row, "
    "max(len(item) + 1 for instruction_length, item in batch), not from batch[0]."
)
MAX_LENGTH = (
    "with allowed_max_length set, cut every row of the inputs and of the targets to "
    "that many positions (inputs[:allowed_max_length]), after the masking."
)
IN_PLACE = (
    "your function changed the batch it was given: the token lists belong to the "
    "dataset, and padding them in place pads the dataset's items, so the next epoch "
    "collates padded items. Pad a copy: item.copy() + [pad_token_id], or list(item) + ...."
)


@dataclass
class _Case:
    """One batch the check collates, with what helpers' solution makes of it."""

    name: str
    items: list
    kwargs: dict = field(default_factory=dict)
    shape_hint: str = "pad every row to the longest item + 1, then drop one position: (rows, longest item) for both tensors."
    error_hint: str = "the function raised an error; " + BATCH_ITEMS
    expected: tuple = ()  # inputs, targets (masked), targets without masking

    def shown(self, first: bool) -> str:
        text = (
            repr(self.items)
            if first
            else f"{self.name} (instruction lengths {[n for n, _ in self.items]})"
        )
        return text + "".join(f", {key}={value!r}" for key, value in self.kwargs.items())


@functools.lru_cache(maxsize=1)
def _real_items() -> tuple:
    """REAL_MASKING_ENTRIES as InstructionDataset(..., with_instruction_length=True) items."""
    import helpers

    dataset = helpers.InstructionDataset(
        list(REAL_MASKING_ENTRIES), helpers.get_tokenizer(), with_instruction_length=True
    )
    return tuple((length, tuple(ids)) for length, ids in (dataset[i] for i in range(len(dataset))))


def _masking_cases() -> list[_Case]:
    """The batches the check collates, each with its expected tensors."""
    import helpers

    real = [(length, list(ids)) for length, ids in _real_items()]  # fresh lists every time
    toy = [(length, list(ids)) for length, ids in TOY_MASKING_BATCH]
    cases = [
        _Case("the toy batch", toy),
        _Case(
            "the toy batch with its longest row last",
            [toy[1], toy[2], toy[0]],
            shape_hint=LONGEST_NOT_FIRST,
            error_hint=f"the function raised an error; {LONGEST_NOT_FIRST}",
        ),
        _Case("a batch of three real entries", real),
        _Case(
            "the toy batch",
            toy,
            {"allowed_max_length": 4},
            shape_hint=MAX_LENGTH,
            error_hint="keep listing 7.5's parameter allowed_max_length=None; " + MAX_LENGTH,
        ),
    ]
    for case in cases:  # every expected tensor first: the student's code cannot alter them
        inputs, targets = helpers.custom_collate_fn(
            case.items, mask_instructions=True, **case.kwargs
        )
        plain = helpers.custom_collate_fn([item for _, item in case.items], **case.kwargs)[1]
        case.expected = (inputs, targets, plain)
    return cases


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
    """Why target `position` of a row is wrong, given the row's (instruction_length, token_ids)."""
    instruction_length, token_ids = row_item
    last_prompt_target = instruction_length - 2  # targets 0..length-2 are prompt tokens
    if position == instruction_length - 1 and got == -100:
        return (
            "off by one: the targets are the inputs shifted by one, so target position i "
            "holds token i + 1. Mask the first instruction_length - 1 targets; target "
            "instruction_length - 1 is the first token of the response and must count."
        )
    if position <= last_prompt_target and expected == -100 and got == plain_target:
        if position == last_prompt_target:
            return (
                "off by one: target position i holds token i + 1, so the prompt's last token "
                "sits at target instruction_length - 2. Mask the first instruction_length - 1 "
                "targets."
            )
        return (
            "this target is a prompt token and must be -100: in each row, set the first "
            "instruction_length - 1 targets to ignore_index."
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


def _form_problem(case: _Case, shown: str, got) -> Result | None:
    """A Result when `got` is not two tensors of the expected shapes and dtype."""
    import torch

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
    for label, want, have in zip(("inputs", "targets"), case.expected[:2], got, strict=True):
        if tuple(have.shape) != tuple(want.shape):
            return wrong(
                "7.2",
                f"{shown}, the shape of the {label}",
                tuple(want.shape),
                tuple(have.shape),
                case.shape_hint,
            )
        if have.dtype != want.dtype:
            return wrong(
                "7.2",
                f"{shown}, the dtype of the {label}",
                want.dtype,
                have.dtype,
                "token ids are whole numbers, torch.long (int64), as torch.tensor(a list of "
                "ints) gives: cross_entropy reads float targets as probabilities, and the "
                "embedding layer takes only integer inputs.",
            )
    return None


def _value_problem(case: _Case, shown: str, inputs, targets) -> Result | None:
    """A Result for the first input or target that differs from helpers' solution."""
    import torch

    expected_inputs, expected_targets, plain_targets = case.expected
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
            case.items[row], position, expected, have, plain_targets[row, position].item()
        )
        return wrong(
            "7.2",
            f"{shown}, targets row {row} (instruction_length {case.items[row][0]}), position {position}",
            expected,
            have,
            hint + f" The -100 positions should be: {_ignored_positions(expected_targets)}.",
        )
    return None


def _case_problem(collate, case: _Case, first: bool) -> Result | None:
    """Run the student's collate on one case; a Result if anything is off, else None."""
    shown = case.shown(first)
    kind, got, copies = call_with_copies(collate, case.items, **case.kwargs)
    if kind == "value" and got is None and first:
        return not_attempted("7.2", WHAT)
    if kind == "error":
        hint = case.error_hint
        if isinstance(got, TimeoutError):
            hint = "the function did not return: look for a loop that never ends."
        return wrong("7.2", shown, "(inputs, targets)", describe_error(got), hint)
    problem = _form_problem(case, shown, got)
    if problem is None and not unchanged(copies[0], case.items):
        problem = wrong(
            "7.2", f"{shown}, the batch after the call", case.items, copies[0], IN_PLACE
        )
    if problem is None:
        inputs, targets = (t.detach().cpu() for t in got)
        problem = _value_problem(case, shown, inputs, targets)
    return problem


def check_instruction_masking(collate) -> Result:
    """Exercise 7.2: `collate(batch, **kwargs)` on (instruction_length, token_ids) items.

    Expected: helpers.custom_collate_fn(batch, mask_instructions=True): draft 3's inputs,
    and targets with the padding after the first <|endoftext|> and the first
    instruction_length - 1 targets of every row set to -100; the batch left unchanged.
    """
    cases = _masking_cases()
    for number, case in enumerate(cases):
        problem = _case_problem(collate, case, first=number == 0)
        if problem is not None:
            return problem
    toy, _, real, _ = cases
    return right(
        "7.2",
        "The inputs and targets (values and dtype) equal helpers.custom_collate_fn(batch, "
        f"mask_instructions=True) on the toy batch (-100 at {_ignored_positions(toy.expected[1])}), "
        f"on it with its longest row last, on three real entries (-100 at "
        f"{_ignored_positions(real.expected[1])}) and with allowed_max_length=4; "
        "every batch was left as it was.",
    )
