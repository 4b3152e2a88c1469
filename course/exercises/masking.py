"""Exercise 7.2: the check of the student's instruction-masking collate function (notebook 02)."""

from __future__ import annotations

from .prompt_style import PHI3_ENTRIES
from .results import Result, call, not_attempted, right, wrong

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
        kind, got = call(collate, items)
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
