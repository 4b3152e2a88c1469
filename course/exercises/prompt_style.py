"""Exercise 7.1: the check of the student's Phi-3 prompt style (notebook 01)."""

from __future__ import annotations

from .results import Result, call, not_attempted, right, wrong

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
        kind, got = call(format_input_phi3, entry)
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
