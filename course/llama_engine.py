"""Running a GGUF file in llama.cpp through llama-cpp-python (notebook 11 and its tests).

Loading an engine sized to the model's context, llama.cpp's tokens and logits, greedy
decoding and the streamed chat, each stopping at the context's end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from course.export import ExportError

INSTALL_LLAMA_CPP = (
    "pip install llama-cpp-python   (no binary wheel for most machines: pip compiles "
    "llama.cpp, which needs a C++ compiler and CMake and takes 10 minutes or more)"
)


def llama_cpp_available() -> bool:
    """True when `llama-cpp-python` (the `llama_cpp` module) can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _trained_context(path: Path) -> int:
    from course import gguf_file

    meta = gguf_file.gguf_metadata(path)
    return int(meta.get(f"{meta.get('general.architecture', 'gpt2')}.context_length", 1024))


def open_llama(path: str | Path, n_ctx: int | None = None, logits_all: bool = False):
    """Load a GGUF file into llama.cpp (`llama_cpp.Llama`), quietly, on the CPU.

    `n_ctx`: the most tokens (prompt and answer) the engine holds; by default the
    model's own context length (1,024 for GPT-2), more is refused. `logits_all=True`
    keeps the logits of every position (`llama_logits`), which costs n_ctx x 50,257
    floats. Without llama-cpp-python it stops with a message saying what to install.
    """
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "llama-cpp-python is not installed, so the GGUF file cannot be run here. "
            f"Install it with: {INSTALL_LLAMA_CPP}. The export itself does not need it."
        ) from None
    path = Path(path)
    trained = _trained_context(path)
    if n_ctx is not None and not 0 < n_ctx <= trained:
        raise ExportError(f"n_ctx={n_ctx}: the model reads 1 to {trained} tokens at once.")
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx or trained,
            logits_all=logits_all,
            n_threads=max(1, min(4, os.cpu_count() or 1)),
            verbose=False,
        )
    except ValueError as exc:
        raise ExportError(
            f"llama.cpp could not load {path.name} ({exc}). Export it again with "
            "course.gguf_file.write_gguf; if that does not help, update llama-cpp-python."
        ) from None


def context_size(llm) -> int:
    """How many tokens `llm` holds: its context, at most the model's own.

    llama.cpp rounds a context up (to 256 tokens), but llama-cpp-python keeps the
    logits of every position in a table of the size asked for, so that size counts.
    """
    size = llm.n_ctx()
    trained = llm.metadata.get(f"{llm.metadata.get('general.architecture', '')}.context_length")
    if trained:
        size = min(size, int(trained))
    if getattr(llm, "_logits_all", True):
        size = min(size, len(llm.scores))
    return size


def llama_tokenize(llm, text: str) -> list[int]:
    """llama.cpp's token ids for `text` (no extra start token; <|endoftext|> as special)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _evaluate(llm, token_ids: list[int]) -> None:
    size = context_size(llm)
    if len(token_ids) > size:
        raise ExportError(
            f"The prompt is {len(token_ids):,} tokens long; this engine holds {size:,}. "
            "Shorten it (the model reads at most its context length at once)."
        )
    llm.reset()
    llm.eval(token_ids)


def llama_logits(llm, token_ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `token_ids` (needs `logits_all=True`)."""
    if not getattr(llm, "_logits_all", True):
        raise ExportError(
            "llama_logits needs an engine opened with open_llama(..., logits_all=True)."
        )
    _evaluate(llm, token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def _last_logits(llm) -> np.ndarray:
    """The logits after the last evaluated token, whatever `logits_all` is."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def next_token_logits(llm, token_ids: list[int]) -> np.ndarray:
    """llama.cpp's logits of the token after `token_ids` (any engine)."""
    _evaluate(llm, token_ids)
    return _last_logits(llm)


def llama_greedy(llm, token_ids: list[int], max_new_tokens: int, eos_id: int | None = None):
    """Greedy decoding in llama.cpp: the argmax of the engine's logits, token by token.

    Works on any engine of `open_llama`. It stops at `eos_id`, after `max_new_tokens`,
    or when the engine's context is full (the last token is then predicted, not read).
    """
    _evaluate(llm, token_ids)
    size, new = context_size(llm), []
    while len(new) < max_new_tokens:
        next_id = int(np.argmax(_last_logits(llm)))
        if next_id == eos_id:
            break
        new.append(next_id)
        if len(new) == max_new_tokens or llm.n_tokens >= size:
            break
        llm.eval([next_id])
    return new


def chat_stream(llm, prompt: str, max_tokens: int, stop: list[str]) -> Iterator[str]:
    """The model's answer to a full prompt, streamed by llama.cpp piece by piece (greedy).

    It ends at a stop sequence, after `max_tokens` tokens, or where the engine's
    context is full; a prompt that fills it alone stops with a message.
    """
    size, n_prompt = context_size(llm), len(llama_tokenize(llm, prompt))
    if n_prompt >= size:
        raise ExportError(
            f"The prompt is {n_prompt:,} tokens long and leaves no room for an answer in "
            f"the model's context of {size:,} tokens: shorten the instruction."
        )
    for chunk in llm.create_completion(
        prompt,
        max_tokens=min(max_tokens, size - n_prompt),
        temperature=0.0,
        top_k=1,
        repeat_penalty=1.0,
        stop=stop,
        stream=True,
    ):
        yield chunk["choices"][0]["text"]
