"""The exercise checks of notebooks 01 (7.1) and 02 (7.2) can fail.

The solution and the scaffold are taken from the notebooks themselves: the code block
of the folded solution and the scaffold cell. Each check must accept the solution, say
"not attempted yet" for the scaffold, and reject each wrong version with its own hint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

import course.exercises as exercises
import course.exercises.results as results
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


def define(source: str, name: str, *names: str):
    """Run a notebook cell's code in a fresh namespace (with the notebook's imports).

    The function `name`, or with more `names` a tuple of all of them.
    """
    namespace = {"torch": torch, "helpers": helpers}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    if names:
        return tuple(namespace[n] for n in (name, *names))
    return namespace[name]


PHI3_NAMES = ("format_input_phi3", "format_response_phi3", "extract_response_phi3")


# -- exercise 7.1 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phi3_cells():
    return notebook_code(NB01, "format_input_phi3")


@pytest.fixture(scope="module")
def phi3_solution(phi3_cells):
    return define(phi3_cells[1], *PHI3_NAMES)


def test_7_1_the_notebooks_solution_is_right(phi3_solution):
    result = exercises.check_phi3_style(*phi3_solution)
    assert result.status == "right", result.message
    assert "4 entries (2 with an input" in result.message
    assert "6 generated texts" in result.message


def test_7_1_the_notebooks_scaffold_is_not_attempted(phi3_cells):
    result = exercises.check_phi3_style(*define(phi3_cells[0], *PHI3_NAMES))
    assert result.status == "not attempted"
    assert str(result).startswith("Exercise 7.1: not attempted yet")


# The book's solution of exercise 7.1, as printed: its format_input, the response
# template of its InstructionDataset and the line that extracts a generated response.
def book_format_input(entry):
    instruction_text = f"<|user|>\n{entry['instruction']}"

    input_text = f"\n{entry['input']}" if entry["input"] else ""

    return instruction_text + input_text


def book_response_text(entry):
    response_text = f"\n<|assistant|>:\n{entry['output']}"
    return response_text


def book_extraction(generated_text, input_text):
    response_text = generated_text[len(input_text) :].replace("<|assistant|>:", "").strip()
    return response_text


BOOK_PHI3 = (book_format_input, book_response_text, book_extraction)


def test_7_1_the_books_printed_solution_is_right():
    result = exercises.check_phi3_style(*BOOK_PHI3)
    assert result.status == "right", result.message


def test_7_1_an_extraction_that_splits_on_the_marker_is_told_about_a_missing_marker():
    def split_on_marker(generated_text, input_text):
        return generated_text.split("<|assistant|>:")[1].strip()

    result = exercises.check_phi3_style(book_format_input, book_response_text, split_on_marker)
    assert result.status == "wrong", result.message
    assert "IndexError" in result.message
    assert "need not contain the marker" in result.message


def _phi3(entry, input_sep="\n", end="", always_input=False):
    text = f"<|user|>\n{entry['instruction']}"
    if entry["input"] or always_input:
        text += input_sep + entry["input"]
    return text + end


def _moves_the_input(entry):
    """Right prompts, but it rewrites the caller's entry: the input moves into the instruction."""
    if entry["input"]:
        entry["instruction"] = entry["instruction"] + "\n" + entry["input"]
        entry["input"] = ""
    return f"<|user|>\n{entry['instruction']}"


def _endless(*args):
    while True:
        pass


WRONG_PROMPTS = {
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
    "rewrites the caller's entry": (_moves_the_input, "changed the entry it was given"),
    "raises": (lambda e: e["prompt"], "raised an error on this entry"),
    "not a string": (lambda e: _phi3(e).split("\n"), "one string"),
    "None for an entry with an input": (
        lambda e: None if e["input"] == "pear\napple" else _phi3(e),
        "one string",
    ),
}


@pytest.mark.parametrize("name", WRONG_PROMPTS)
def test_7_1_wrong_prompts_get_their_own_hint(name):
    function, words = WRONG_PROMPTS[name]
    result = exercises.check_phi3_style(function, book_response_text, book_extraction)
    assert result.status == "wrong", result.message
    assert words in result.message, result.message
    # the first concrete difference: the entry, what was expected, what came back
    assert "input:    {'instruction'" in result.message
    assert "got: " in result.message


def test_7_1_a_prompt_that_rewrites_the_entry_shows_the_entry_before_and_after():
    result = exercises.check_phi3_style(_moves_the_input, book_response_text, book_extraction)
    assert "the entry after the call" in result.message
    assert (
        "expected: {'instruction': 'Identify the correct spelling of the following word.', 'input': 'Ocassion'"
        in result.message
    )
    assert "'input': ''" in result.message.split("got:")[1]


WRONG_RESPONSES = {
    "alpaca": (lambda e: helpers.format_response(e, "alpaca"), "Alpaca response"),
    "no marker": (lambda e: "\n" + e["output"], "marker on a line of its own"),
    "no colon": (lambda e: f"\n<|assistant|>\n{e['output']}", "with a colon"),
    "no leading newline": (lambda e: f"<|assistant|>:\n{e['output']}", "start with a newline"),
    "output left out": (lambda e: "\n<|assistant|>:\n", "the output follows the marker line"),
    "newline after the output": (
        lambda e: f"\n<|assistant|>:\n{e['output']}\n",
        "no newline after the output",
    ),
    "with the prompt": (lambda e: _phi3(e) + book_response_text(e), "holds no prompt"),
    "raises": (lambda e: e["response"], "format_response_phi3: it raised an error"),
    "bytes": (lambda e: book_response_text(e).encode(), "one string"),
}


@pytest.mark.parametrize("name", WRONG_RESPONSES)
def test_7_1_wrong_response_templates_get_their_own_hint(name):
    function, words = WRONG_RESPONSES[name]
    result = exercises.check_phi3_style(book_format_input, function, book_extraction)
    assert result.status == "wrong", result.message
    assert words in result.message, result.message


WRONG_EXTRACTIONS = {
    "marker kept": (lambda g, i: g[len(i) :].strip(), "drop the marker"),
    "prompt kept": (
        lambda g, i: g.replace("<|assistant|>:", "").strip(),
        "cut off the prompt first",
    ),
    "not stripped": (
        lambda g, i: g[len(i) :].replace("<|assistant|>:", ""),
        "strip the spaces and newlines",
    ),
    "alpaca marker": (
        lambda g, i: g[len(i) :].replace("### Response:", "").strip(),
        "drop the marker",
    ),
    "a list": (lambda g, i: g[len(i) :].split(), "one string"),
}


@pytest.mark.parametrize("name", WRONG_EXTRACTIONS)
def test_7_1_wrong_extractions_get_their_own_hint(name):
    function, words = WRONG_EXTRACTIONS[name]
    result = exercises.check_phi3_style(book_format_input, book_response_text, function)
    assert result.status == "wrong", result.message
    assert words in result.message, result.message
    assert 'generated_text="<|user|>' in result.message


def test_7_1_hints_differ():
    hints = {
        exercises.check_phi3_style(f, book_response_text, book_extraction).message.split("hint:")[1]
        for f, _ in WRONG_PROMPTS.values()
    }
    hints |= {
        exercises.check_phi3_style(book_format_input, f, book_extraction).message.split("hint:")[1]
        for f, _ in WRONG_RESPONSES.values()
    }
    assert len(hints) >= len(WRONG_PROMPTS) + len(WRONG_RESPONSES) - 3


@pytest.mark.parametrize("part", range(3))
def test_7_1_an_endless_loop_becomes_a_hint(part, monkeypatch):
    monkeypatch.setattr(results, "CALL_SECONDS", 0.3)
    functions = list(BOOK_PHI3)
    functions[part] = _endless
    result = exercises.check_phi3_style(*functions)
    assert result.status == "wrong"
    assert "TimeoutError: it did not return within 0.3 s" in result.message
    assert f"{PHI3_NAMES[part]} did not return" in result.message


def test_7_1_a_function_that_changes_helpers_is_still_judged_by_the_book():
    original = helpers.format_input

    def cheat(entry):  # right once, then makes helpers agree with its wrong prompts
        prompt = helpers.format_input(entry, "phi3")
        helpers.format_input = lambda entry, style="alpaca": "<|user|>\n?"
        return prompt

    try:
        result = exercises.check_phi3_style(cheat, book_response_text, book_extraction)
    finally:
        helpers.format_input = original
    assert result.status == "wrong"


def test_7_1_once_right_the_notebook_runs_the_students_functions(phi3_solution):
    result = exercises.check_phi3_style(*phi3_solution)
    style = exercises.phi3_style(result, *phi3_solution)
    assert style.yours
    assert style.format_input is phi3_solution[0]
    assert style.extract_response is phi3_solution[2]
    assert style.formatted_by == "your format_input_phi3 and format_response_phi3"
    assert style.extracted_by == "your extract_response_phi3"


def test_7_1_until_right_the_notebook_runs_the_courses_solution(phi3_cells):
    scaffold = define(phi3_cells[0], *PHI3_NAMES)
    style = exercises.phi3_style(exercises.check_phi3_style(*scaffold), *scaffold)
    assert not style.yours
    assert style.formatted_by.startswith("the course's solution")
    assert "not attempted yet" in style.formatted_by
    entry = exercises.PHI3_ENTRIES[0]
    assert style.format_input(entry) == helpers.format_input(entry, "phi3")
    assert style.format_response(entry) == helpers.format_response(entry, "phi3")
    wrong_style = exercises.phi3_style(
        exercises.check_phi3_style(_moves_the_input, book_response_text, book_extraction),
        _moves_the_input,
        book_response_text,
        book_extraction,
    )
    assert not wrong_style.yours and "not right yet" in wrong_style.formatted_by


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


# The book's solution of exercise 7.2, as printed (its custom_collate_fn for
# (instruction_length, item) pairs).
def book_custom_collate_fn(
    batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu"
):
    # Find the longest sequence in the batch
    batch_max_length = max(len(item) + 1 for instruction_length, item in batch)

    # Pad and prepare inputs and targets
    inputs_lst, targets_lst = [], []

    for instruction_length, item in batch:
        new_item = item.copy()
        # Add an <|endoftext|> token
        new_item += [pad_token_id]
        # Pad sequences to max_length
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # Truncate the last token for inputs
        targets = torch.tensor(padded[1:])  # Shift +1 to the right for targets

        # Replace all but the first padding tokens in targets by ignore_index
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index

        # Mask all input and instruction tokens in the targets
        targets[: instruction_length - 1] = -100

        # Optionally truncate to maximum sequence length
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]

        inputs_lst.append(inputs)
        targets_lst.append(targets)

    # Convert list of inputs and targets to tensors and transfer to target device
    inputs_tensor = torch.stack(inputs_lst).to(device)
    targets_tensor = torch.stack(targets_lst).to(device)

    return inputs_tensor, targets_tensor


def test_7_2_the_books_printed_solution_is_right():
    result = exercises.check_instruction_masking(book_custom_collate_fn)
    assert result.status == "right", result.message


def test_7_2_the_books_solution_equals_the_course_on_a_real_loader():
    tokenizer = helpers.get_tokenizer()
    data = json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))[:16]
    dataset = helpers.InstructionDataset(data, tokenizer, with_instruction_length=True)
    batch = [dataset[i] for i in range(len(dataset))]
    book = book_custom_collate_fn(batch, allowed_max_length=1024)
    course = helpers.custom_collate_fn(batch, allowed_max_length=1024, mask_instructions=True)
    assert all(torch.equal(a, b) for a, b in zip(book, course, strict=True))


def _collate(
    batch,
    allowed_max_length=None,
    *,
    mask=1,
    pad_from=0,
    mask_inputs=False,
    drop_last=True,
    mutate=False,
    width_from_first=False,
    dtype=torch.long,
    ignore_max_length=False,
):
    """Draft 3 with masking on (instruction_length, token_ids) pairs, a knob for each mistake."""
    rows = batch[:1] if width_from_first else batch
    width = max(len(ids) for _, ids in rows) + 1
    inputs, targets = [], []
    for instruction_length, ids in batch:
        length = len(ids)
        if mutate:  # pads the caller's own list in place
            ids += [50256] * (width - length)
            padded = ids
        else:
            padded = list(ids) + [50256] * (width - length)
        x = torch.tensor(padded[:-1] if drop_last else padded, dtype=dtype)
        y = torch.tensor(padded[1:] if drop_last else padded[1:] + [50256], dtype=dtype)
        if pad_from is not None:
            y[length + pad_from :] = -100
        if mask is not None:
            y[: instruction_length - mask] = -100
            if mask_inputs:
                x[: instruction_length - mask] = -100
        if allowed_max_length is not None and not ignore_max_length:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs), torch.stack(targets)


def _no_max_length_parameter(batch):
    return _collate(batch)


WRONG_MASKING = {
    "no masking": (lambda b, **k: _collate(b, **k, mask=None), "prompt token and must be -100"),
    "one too many": (
        lambda b, **k: _collate(b, **k, mask=0),
        "first token of the response and must count",
    ),
    "one too few": (lambda b, **k: _collate(b, **k, mask=2), "the prompt's last token sits at"),
    "padding kept": (lambda b, **k: _collate(b, **k, pad_from=None), "padding beyond the row's"),
    "end of text masked": (
        lambda b, **k: _collate(b, **k, pad_from=-1),
        "first <|endoftext|> target: keep it",
    ),
    "inputs masked": (
        lambda b, **k: _collate(b, **k, mask_inputs=True),
        "masking changes only the targets",
    ),
    "no position dropped": (
        lambda b, **k: _collate(b, **k, drop_last=False),
        "the shape of the inputs",
    ),
    "one tensor": (lambda b, **k: _collate(b, **k)[1], "a pair of tensors"),
    "None for the second batch": (
        lambda b, **k: None if b[0][0] == 2 else _collate(b, **k),
        "a pair of tensors",
    ),
    "lists, not tensors": (
        lambda b, **k: tuple(t.tolist() for t in _collate(b, **k)),
        "a pair of tensors",
    ),
    # the pairs read the other way round: (token_ids, instruction_length)
    "pairs swapped": (
        lambda b, **k: _collate([(ids, n) for n, ids in b], **k),
        "(instruction_length, token_ids) pairs",
    ),
    "pads the dataset's lists in place": (
        lambda b, **k: _collate(b, **k, mutate=True),
        "changed the batch it was given",
    ),
    "width from the first row": (
        lambda b, **k: _collate(b, **k, width_from_first=True),
        "the longest row is not the first",
    ),
    "float targets": (
        lambda b, **k: _collate(b, **k, dtype=torch.float32),
        "torch.long (int64)",
    ),
    "ignores allowed_max_length": (
        lambda b, **k: _collate(b, **k, ignore_max_length=True),
        "with allowed_max_length set, cut every row",
    ),
    "no allowed_max_length parameter": (
        _no_max_length_parameter,
        "keep listing 7.5's parameter allowed_max_length",
    ),
}


@pytest.mark.parametrize("name", WRONG_MASKING)
def test_7_2_wrong_versions_get_their_own_hint(name):
    function, words = WRONG_MASKING[name]
    result = exercises.check_instruction_masking(function)
    assert result.status == "wrong", result.message
    assert words in result.message, result.message
    assert "input:    [(" in result.message or "input:    the toy batch" in result.message


def test_7_2_the_first_wrong_position_is_named():
    result = exercises.check_instruction_masking(lambda b, **k: _collate(b, **k, mask=0))
    assert "input:    [(4, [10, 11, 12, 13, 14, 15])" in result.message
    assert "targets row 0 (instruction_length 4), position 3" in result.message
    assert "expected: 14\n" in result.message and "got:      -100\n" in result.message


def test_7_2_a_batch_padded_in_place_is_shown_before_and_after():
    result = exercises.check_instruction_masking(lambda b, **k: _collate(b, **k, mutate=True))
    assert "the batch after the call" in result.message
    assert "got:      [(4, [10, 11, 12, 13, 14, 15, 50256])" in result.message


def test_7_2_an_endless_loop_becomes_a_hint(monkeypatch):
    monkeypatch.setattr(results, "CALL_SECONDS", 0.3)
    result = exercises.check_instruction_masking(_endless)
    assert result.status == "wrong"
    assert "TimeoutError: it did not return within 0.3 s" in result.message
    assert "look for a loop that never ends" in result.message


def test_7_2_hints_differ():
    hints = {
        exercises.check_instruction_masking(f).message.split("hint:")[1]
        for f, _ in WRONG_MASKING.values()
    }
    assert len(hints) >= len(WRONG_MASKING) - 3


def test_7_2_once_right_the_notebook_runs_the_students_collate(masking_cells):
    collate = define(masking_cells[1], "custom_collate_with_masking")
    result = exercises.check_instruction_masking(collate)
    chosen = exercises.choose(
        result, collate, helpers.custom_collate_fn, "custom_collate_with_masking", "helpers"
    )
    assert chosen.yours and chosen.code is collate
    assert chosen.by == "your custom_collate_with_masking"
    scaffold = define(masking_cells[0], "custom_collate_with_masking")
    chosen = exercises.choose(
        exercises.check_instruction_masking(scaffold),
        scaffold,
        helpers.custom_collate_fn,
        "custom_collate_with_masking",
        "helpers.custom_collate_fn",
    )
    assert not chosen.yours and chosen.code is helpers.custom_collate_fn
    assert chosen.by == (
        "the course's solution, helpers.custom_collate_fn (exercise 7.2: not attempted yet)"
    )


# -- the student's code runs the notebook ---------------------------------------------


def run_with_solution(path: Path, name: str) -> list:
    """Run notebook `path` with its scaffold for `name` replaced by the folded solution."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    scaffold, solution = notebook_code(path, name)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source == scaffold:
            cell.source = solution
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return nb.cells


def cell_text(cell) -> str:
    return "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs
    )


def output_of(cells, start: str) -> str:
    """The text output of the one code cell whose source starts with `start`."""
    found = [cell_text(c) for c in cells if c.cell_type == "code" and c.source.startswith(start)]
    assert len(found) == 1, start
    return found[0]


def test_with_the_solutions_pasted_in_notebooks_01_and_02_run_the_students_code(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path / "artifacts"))
    for name in ("COURSE_DATASET", "COURSE_DATA_LIMIT", "COURSE_PROMPT_STYLE"):
        monkeypatch.delenv(name, raising=False)
    stored01 = nbformat.read(NB01, as_version=4).cells
    cells = run_with_solution(NB01, "format_input_phi3")
    assert output_of(cells, "import course.exercises").startswith("Exercise 7.1: right.")
    examples = output_of(cells, "import textwrap")
    assert examples.startswith(
        "Phi-3 column formatted by your format_input_phi3 and format_response_phi3\n"
    )
    # the student's functions give the very texts the course's solution gave
    course_examples = output_of(stored01, "import textwrap")
    assert examples.split("\n", 1)[1] == course_examples.split("\n", 1)[1]
    extraction = output_of(cells, "entry = data[with_input]")
    assert "Extracted by your extract_response_phi3:\n" in extraction
    lengths = output_of(cells, "formatters = {")
    assert lengths.startswith("Phi-3 texts formatted by your format_input_phi3")
    assert "phi3:  38.9 tokens per entry on average, 42,800 in all" in lengths

    cells = run_with_solution(NB02, "custom_collate_with_masking")
    assert output_of(cells, "import course.exercises").startswith("Exercise 7.2: right.")
    picture = output_of(cells, "from functools import partial\n\nPROMPT")
    assert "masked targets made by your custom_collate_with_masking\n" in picture
    stored = output_of(
        nbformat.read(NB02, as_version=4).cells, "from functools import partial\n\nPROMPT"
    )
    assert picture.split("\n")[2:] == stored.split("\n")[2:]  # the same counts
