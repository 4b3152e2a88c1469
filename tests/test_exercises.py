"""The exercise checks of notebooks 01 (7.1) and 02 (7.2) can fail.

The solution and the scaffold are taken from the notebooks themselves: the code block
of the folded solution and the scaffold cell. Each check must accept the solution, say
"not attempted yet" for the scaffold, and reject each wrong version with its own hint.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch

import course.exercises as exercises
import helpers

ROOT = Path(__file__).resolve().parent.parent
NB01 = ROOT / "01_dataset_download_and_formatting.ipynb"
NB02 = ROOT / "02_batching_the_dataset.ipynb"


def notebook_code(path: Path, name: str) -> tuple[str, str]:
    """(the scaffold cell's code, the folded solution's code) defining `name`."""
    cells = nbformat.read(path, as_version=4).cells
    scaffolds = [
        c.source
        for c in cells
        if c.cell_type == "code"
        and c.source.startswith(f"def {name}(")
        and "# your code here" in c.source
    ]
    solutions = [
        block
        for c in cells
        if c.cell_type == "markdown" and "<summary>Solution</summary>" in c.source
        for block in re.findall(r"```python\n(.*?)```", c.source, re.S)
        if f"def {name}(" in block
    ]
    assert len(scaffolds) == 1, f"{path.name}: expected one scaffold cell for {name}"
    assert len(solutions) == 1, f"{path.name}: expected one folded solution for {name}"
    return scaffolds[0], solutions[0]


def define(source: str, name: str):
    """Run a notebook cell's code in a fresh namespace (with the notebook's imports)."""
    namespace = {"torch": torch, "helpers": helpers}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace[name]


# -- exercise 7.1 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phi3_cells():
    return notebook_code(NB01, "format_input_phi3")


def test_7_1_the_notebooks_solution_is_right(phi3_cells):
    result = exercises.check_format_input_phi3(define(phi3_cells[1], "format_input_phi3"))
    assert result.status == "right", result.message
    assert "4 entries (2 with an input" in result.message


def test_7_1_the_notebooks_scaffold_is_not_attempted(phi3_cells):
    result = exercises.check_format_input_phi3(define(phi3_cells[0], "format_input_phi3"))
    assert result.status == "not attempted"
    assert str(result).startswith("Exercise 7.1: not attempted yet")


def _phi3(entry, input_sep="\n", end="", always_input=False):
    text = f"<|user|>\n{entry['instruction']}"
    if entry["input"] or always_input:
        text += input_sep + entry["input"]
    return text + end


WRONG_PHI3 = {
    "alpaca": (lambda e: helpers.format_input(e, "alpaca"), "Alpaca template"),
    "with the response": (
        lambda e: _phi3(e) + helpers.format_response(e, "phi3"),
        "belong to the response part",
    ),
    "marker on the instruction's line": (
        lambda e: f"<|user|> {e['instruction']}" + (f"\n{e['input']}" if e["input"] else ""),
        "'<|user|>' marker on a line of its own",
    ),
    "no marker": (
        lambda e: _phi3(e)[len("<|user|>\n") :],
        "'<|user|>' marker on a line of its own",
    ),
    "input line when empty": (lambda e: _phi3(e, always_input=True), "input is empty"),
    "trailing newline": (
        lambda e: _phi3(e, end="\n") if e["input"] else _phi3(e),
        "no newline at the end",
    ),
    "empty line before the input": (
        lambda e: _phi3(e, input_sep="\n\n"),
        "one newline between the instruction and the input",
    ),
    "input left out": (lambda e: _phi3({**e, "input": ""}), "put it on the line after"),
    "raises": (lambda e: e["prompt"], "raised an error"),
    "not a string": (lambda e: _phi3(e).split("\n"), "one string"),
}


@pytest.mark.parametrize("name", WRONG_PHI3)
def test_7_1_wrong_versions_get_their_own_hint(name):
    function, words = WRONG_PHI3[name]
    result = exercises.check_format_input_phi3(function)
    assert result.status == "wrong", result.message
    assert words in result.message, result.message
    # the first concrete difference: the entry, what was expected, what came back
    assert "input:    {'instruction'" in result.message
    assert re.search(r"expected: ['\"]<\|user\|>\\n", result.message), result.message
    assert "got: " in result.message


def test_7_1_hints_differ():
    hints = {
        exercises.check_format_input_phi3(f).message.split("hint:")[1]
        for f, _ in WRONG_PHI3.values()
    }
    assert len(hints) >= 8


def test_7_1_a_function_that_changes_helpers_is_still_judged_by_the_book():
    original = helpers.format_input

    def cheat(entry):  # right once, then makes helpers agree with its wrong prompts
        prompt = helpers.format_input(entry, "phi3")
        helpers.format_input = lambda entry, style="alpaca": "<|user|>\n?"
        return prompt

    try:
        result = exercises.check_format_input_phi3(cheat)
    finally:
        helpers.format_input = original
    assert result.status == "wrong"


# -- exercise 7.2 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def masking_cells():
    return notebook_code(NB02, "custom_collate_with_masking")


def test_7_2_the_notebooks_solution_is_right(masking_cells):
    result = exercises.check_instruction_masking(
        define(masking_cells[1], "custom_collate_with_masking")
    )
    assert result.status == "right", result.message
    # it states which positions are -100
    assert "row 0: 0-2; row 1: 0, 3-5; row 2: 0-1, 4-5" in result.message


def test_7_2_the_notebooks_scaffold_is_not_attempted(masking_cells):
    result = exercises.check_instruction_masking(
        define(masking_cells[0], "custom_collate_with_masking")
    )
    assert result.status == "not attempted"
    assert str(result).startswith("Exercise 7.2: not attempted yet")


def _collate(
    batch,
    mask=1,
    pad_from=0,
    mask_inputs=False,
    drop_last=True,
    mutate=False,
):
    """Draft 3 with masking, and a knob for each mistake."""
    width = max(len(ids) for ids, _ in batch) + 1
    inputs, targets = [], []
    for ids, prompt_length in batch:
        if mutate:  # pads the caller's own list in place
            ids.extend([50256] * (width - len(ids)))
            padded = ids
        else:
            padded = list(ids) + [50256] * (width - len(ids))
        length = width - padded.count(50256) if mutate else len(ids)
        x = torch.tensor(padded[:-1] if drop_last else padded)
        y = torch.tensor(padded[1:] if drop_last else padded[1:] + [50256])
        if pad_from is not None:
            y[length + pad_from :] = -100
        if mask is not None:
            y[: prompt_length - mask] = -100
            if mask_inputs:
                x[: prompt_length - mask] = -100
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs), torch.stack(targets)


WRONG_MASKING = {
    "no masking": (lambda b: _collate(b, mask=None), "prompt token and must be -100"),
    "one too many": (lambda b: _collate(b, mask=0), "first token of the response and must count"),
    "one too few": (lambda b: _collate(b, mask=2), "the prompt's last token sits at target"),
    "padding kept": (lambda b: _collate(b, pad_from=None), "padding beyond the row's first"),
    "end of text masked": (
        lambda b: _collate(b, pad_from=-1),
        "first <|endoftext|> target: keep it",
    ),
    "inputs masked": (lambda b: _collate(b, mask_inputs=True), "masking changes only the targets"),
    "no position dropped": (lambda b: _collate(b, drop_last=False), "the shape of the inputs"),
    "one tensor": (lambda b: _collate(b)[1], "a pair of tensors"),
    # the pairs read the wrong way round: (prompt_length, token_ids)
    "pairs swapped": (lambda b: _collate([(n, ids) for ids, n in b]), "raised an error"),
}


@pytest.mark.parametrize("name", WRONG_MASKING)
def test_7_2_wrong_versions_get_their_own_hint(name):
    function, words = WRONG_MASKING[name]
    result = exercises.check_instruction_masking(function)
    assert result.status == "wrong", result.message
    assert words in result.message, result.message
    assert "input:    [([10, 11, 12, 13, 14, 15], 4)" in result.message


def test_7_2_the_first_wrong_position_is_named():
    result = exercises.check_instruction_masking(lambda b: _collate(b, mask=0))
    assert "targets row 0 (prompt_length 4), position 3" in result.message
    assert "expected: 14\n" in result.message and "got:      -100\n" in result.message


def test_7_2_a_function_that_pads_its_items_in_place_is_judged_on_what_it_returns():
    # the check hands every call its own copy, so mutating the batch changes nothing
    assert exercises.check_instruction_masking(lambda b: _collate(b, mutate=True)).status == "right"
    assert exercises.check_instruction_masking(lambda b: _collate(b)).status == "right"
