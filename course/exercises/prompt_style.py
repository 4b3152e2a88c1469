"""Exercise 7.1: the check of the student's Phi-3 prompt style (notebook 01).

Three parts, as in the book's solution: the prompt, the response template and the
extraction of a generated response; `phi3_style` then picks whose functions run next.
"""

from __future__ import annotations

from dataclasses import dataclass

from .results import (
    NOT_ATTEMPTED,
    Result,
    call_with_copies,
    describe_error,
    not_attempted,
    right,
    unchanged,
    wrong,
)

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

PHI3_MARKER = "<|assistant|>:"  # what the book's extraction removes from a response

CHANGED_ENTRY_HINT = (
    "your function changed the entry it was given (compare the entry before and after "
    "the call): build a new string and leave the entry as it is. The same entry is "
    "formatted again for its response, for the test set and in every epoch."
)


def _prompt_hint(entry: dict, expected: str, got: str) -> str:
    """What is most likely wrong with `got`, a Phi-3 prompt that differs from `expected`."""
    if "### " in got or got.startswith("Below is an instruction"):
        return (
            "that is the Alpaca template. Phi-3 has no preamble and no '###' headings: "
            "'<|user|>', a newline, the instruction."
        )
    if "<|assistant|>" in got:
        return (
            "format_input_phi3 gives the prompt only; the '<|assistant|>:' line and the "
            "output belong to the response part (format_response_phi3)."
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


def _response_hint(entry: dict, expected: str, got: str) -> str:
    """What is most likely wrong with `got`, a Phi-3 response part unlike `expected`."""
    if "### Response:" in got:
        return "that is the Alpaca response; Phi-3's marker is '<|assistant|>:'."
    if "<|user|>" in got or entry["instruction"] in got:
        return "the response part holds no prompt: only the marker line and the output."
    if "<|assistant|>" not in got:
        return "the response part starts with the '<|assistant|>:' marker on a line of its own."
    if "<|assistant|>:" not in got:
        return "the book's solution writes the marker with a colon: '<|assistant|>:'."
    if not got.startswith("\n"):
        return (
            "start with a newline: the prompt ends with the instruction or input, and the "
            "marker needs a line of its own ('\\n<|assistant|>:\\n' + output)."
        )
    if entry["output"] not in got:
        return "the output follows the marker line: '\\n<|assistant|>:\\n' + entry['output']."
    if got.rstrip("\n") == expected:
        return "no newline after the output: the collate function appends <|endoftext|> there."
    return "compare character by character: '\\n<|assistant|>:\\n', then the output."


def _extraction_hint(prompt: str, expected: str, got: str) -> str:
    """What is most likely wrong with `got`, an extracted response unlike `expected`."""
    if "<|assistant|>" in got:
        return f"drop the marker: .replace({PHI3_MARKER!r}, '') removes it wherever it is."
    if got.startswith("<|user|>") or prompt.split("\n")[-1] in got:
        return "cut off the prompt first: generated_text[len(input_text):] is what the model added."
    if got.strip() == expected:
        return "strip the spaces and newlines around the response: .strip()."
    return (
        "the book's extraction: generated_text[len(input_text):].replace('<|assistant|>:', "
        "'').strip()."
    )


@dataclass(frozen=True)
class _Part:
    """One part of exercise 7.1: the student's function and how to judge it."""

    function: object
    name: str
    cases: list  # (arguments, the input as shown, the expected string)
    hint_for: object  # (arguments, expected, got) -> the hint
    error_hint: str  # when the function raises


def _check_part(part: _Part) -> Result | None:
    """Run one part of exercise 7.1 on its cases; a Result if it is not right, else None."""
    for number, (args, shown, expected) in enumerate(part.cases):
        kind, got, copies = call_with_copies(part.function, *args)
        if kind == "value" and got is None and number == 0:
            return not_attempted("7.1", part.name)
        if kind == "error":
            hint = part.error_hint
            if isinstance(got, TimeoutError):
                hint = f"{part.name} did not return: look for a loop that never ends."
            return wrong("7.1", shown, expected, describe_error(got), hint)
        if not isinstance(got, str):
            return wrong("7.1", shown, expected, got, f"{part.name} returns one string (a str).")
        if got != expected:
            return wrong("7.1", shown, expected, got, part.hint_for(args, expected, got))
        if not unchanged(copies, args):
            return wrong(
                "7.1", f"{shown}, the entry after the call", args[0], copies[0], CHANGED_ENTRY_HINT
            )
    return None


def _generated_texts(entry: dict) -> list[tuple[str, str]]:
    """(generated text, prompt) pairs as notebook 07's model might give them."""
    import helpers

    prompt = helpers.format_input(entry, "phi3")
    full = prompt + helpers.format_response(entry, "phi3")
    return [
        (full, prompt),  # the model wrote the marker and the answer
        (full + "\n", prompt),  # with a newline after it
        (prompt + " " + entry["output"], prompt),  # an untrained model may leave the marker out
    ]


def _phi3_parts(format_input_phi3, format_response_phi3, extract_response_phi3) -> list[_Part]:
    """The three parts of exercise 7.1, each with its cases and expected texts."""
    import helpers

    prompts = [((e,), repr(e), helpers.format_input(e, "phi3")) for e in PHI3_ENTRIES]
    responses = [((e,), repr(e), helpers.format_response(e, "phi3")) for e in PHI3_ENTRIES]
    extractions = [
        ((text, prompt), f"generated_text={text!r}, input_text={prompt!r}", expected)
        for entry in PHI3_ENTRIES[:2]
        for text, prompt in _generated_texts(entry)
        for expected in [helpers.extract_response(text, prompt, "phi3")]
    ]
    entry_error = (
        "it raised an error on this entry; it must work for every entry, input empty or not."
    )
    parts = [
        _Part(
            format_input_phi3,
            "format_input_phi3",
            prompts,
            lambda args, expected, got: _prompt_hint(args[0], expected, got),
            "format_input_phi3: " + entry_error,
        ),
        _Part(
            format_response_phi3,
            "format_response_phi3",
            responses,
            lambda args, expected, got: _response_hint(args[0], expected, got),
            "format_response_phi3: " + entry_error,
        ),
        _Part(
            extract_response_phi3,
            "extract_response_phi3",
            extractions,
            lambda args, expected, got: _extraction_hint(args[1], expected, got),
            "extract_response_phi3 raised an error on this text. A generated text need not "
            "contain the marker (an untrained model often leaves it out): cut the prompt off "
            "with generated_text[len(input_text):], then remove the marker with .replace().",
        ),
    ]
    return parts


def check_phi3_style(format_input_phi3, format_response_phi3, extract_response_phi3) -> Result:
    """Exercise 7.1, the three parts of the book's solution, against helpers' "phi3" style.

    The prompt (helpers.format_input), the response template (helpers.format_response)
    and the extraction of a generated response (helpers.extract_response).
    """
    # every expected text first: nothing the student's code changes can alter them
    parts = _phi3_parts(format_input_phi3, format_response_phi3, extract_response_phi3)
    for part in parts:
        problem = _check_part(part)
        if problem is not None:
            return problem
    with_input = sum(1 for entry in PHI3_ENTRIES if entry["input"])
    return right(
        "7.1",
        f"{len(PHI3_ENTRIES)} entries ({with_input} with an input, one of them on two lines; "
        f"{len(PHI3_ENTRIES) - with_input} without) give the very prompts and responses of "
        'helpers.format_input(entry, "phi3") and helpers.format_response(entry, "phi3"), '
        f"each entry left as it was; {len(parts[2].cases)} generated texts give the responses "
        'of helpers.extract_response(generated_text, input_text, "phi3").',
    )


@dataclass(frozen=True)
class Phi3Style:
    """The Phi-3 functions the rest of notebook 01 uses, and whose they are."""

    format_input: object
    format_response: object
    extract_response: object
    yours: bool
    formatted_by: str
    extracted_by: str


def phi3_style(
    result: Result, format_input_phi3, format_response_phi3, extract_response_phi3
) -> Phi3Style:
    """The student's three functions once `result` (check_phi3_style's) says right.

    Until then the course's solution: helpers' functions with style="phi3".
    """
    import helpers

    if result.status == "right":
        return Phi3Style(
            format_input_phi3,
            format_response_phi3,
            extract_response_phi3,
            True,
            "your format_input_phi3 and format_response_phi3",
            "your extract_response_phi3",
        )
    state = NOT_ATTEMPTED if result.status == "not attempted" else "not right yet"
    return Phi3Style(
        lambda entry: helpers.format_input(entry, "phi3"),
        lambda entry: helpers.format_response(entry, "phi3"),
        lambda text, prompt: helpers.extract_response(text, prompt, "phi3"),
        False,
        "the course's solution, helpers.format_input and helpers.format_response with "
        f'style="phi3" (exercise 7.1: {state})',
        f'the course\'s solution, helpers.extract_response with style="phi3" (exercise 7.1: {state})',
    )
