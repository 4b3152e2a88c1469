"""Notebook 11's export: the model to export, the error it stops with, and the Ollama Modelfile.

The GGUF file itself is course.gguf_file's, running it course.llama_engine's, and
registering it with Ollama course.ollama_registry's; all of them stop with ExportError.
"""

from __future__ import annotations

import json
from pathlib import Path

import helpers

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256


class ExportError(RuntimeError):
    """The model cannot be exported or run as asked; the message says what to do."""


def load_weights(model_name: str, path: str | Path) -> helpers.GPTModel:
    """The fine-tuned GPTModel to export, on the CPU, from a `.pth` file.

    The same loading as notebook 07's (`course.responses.load_fine_tuned`): a missing,
    damaged or mismatched file stops with course.weights' message naming the fix.
    """
    from course import responses

    return responses.load_fine_tuned(model_name, path, "cpu")


# -- the Modelfile --------------------------------------------------------------------------


def template(style: str) -> str:
    """Ollama's prompt template (Go template syntax) for a prompt style.

    Rendered with the user's text as `.Prompt`, it gives `helpers.format_input` of an
    entry without input, followed by the response marker (`helpers.format_response`
    with an empty output): the text the model was fine-tuned to continue.
    """
    entry = {"instruction": "{{ .Prompt }}", "input": ""}
    return helpers.format_input(entry, style) + helpers.format_response({"output": ""}, style)


def ollama_prompt(entry: dict, style: str) -> str:
    """What to send to Ollama as the prompt so that the template gives `format_input(entry)`.

    The instruction alone; an entry's input follows it the way `format_input` writes it.
    """
    prompt_alone = helpers.format_input({"instruction": "", "input": ""}, style)
    return helpers.format_input(entry, style)[len(prompt_alone) :]


def stop_sequences(style: str) -> list[str]:
    """Where a response ends: <|endoftext|> and the start of a new prompt section."""
    if style == "alpaca":
        return [END_OF_TEXT, "### Instruction:", "### Input:", "### Response:"]
    if style == "phi3":
        return [END_OF_TEXT, "<|user|>", "<|assistant|>"]
    raise ExportError(f'Unknown prompt style {style!r}: use "alpaca" or "phi3".')


def ollama_parameters(style: str, context_length: int) -> dict:
    """The Modelfile's PARAMETERs: greedy decoding, the context length, the stops."""
    return {
        "temperature": 0,  # greedy, like the course's generate
        "top_k": 1,
        "repeat_penalty": 1.0,  # no penalty: the book's generate has none
        "num_ctx": context_length,
        "stop": stop_sequences(style),
    }


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile(gguf_file: str, style: str, context_length: int) -> str:
    """An Ollama Modelfile for `gguf_file` (a path relative to the Modelfile's folder).

    `ollama create <name> -f <this file>` builds a model that answers in the run's
    prompt style, greedily, and stops at <|endoftext|> or a new prompt section.
    """
    lines = [
        "# An Ollama Modelfile for the fine-tuned GPT-2 of this course.",
        "# Use it with: ollama create <name> -f <this file>",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{template(style)}"""',
    ]
    for key, value in ollama_parameters(style, context_length).items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_quoted(item) if isinstance(item, str) else item}")
    return "\n".join(lines) + "\n"
