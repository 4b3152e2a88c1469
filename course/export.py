"""Taking the model home (notebook 11): GGUF export, an Ollama Modelfile, llama.cpp and Ollama.

The fine-tuned weights of notebook 05 (or notebook 10) are a PyTorch `.pth` file that
only this course's code can run. GGUF is the single-file format of llama.cpp, the
engine inside Ollama: the weights under the engine's tensor names, the model's
hyperparameters, and the tokenizer, all in one file. This module

- maps the book's `GPTModel` parameters to GGUF's names for the `gpt2` architecture
  (`tensor_name_map`), fusing the query, key and value projections into one tensor;
- writes a GGUF file in f32, f16 or Q8_0 with the GPT-2 tokenizer inside
  (`write_gguf`);
- writes an Ollama Modelfile whose template is the run's prompt style (`modelfile`);
- runs a GGUF file in llama.cpp through `llama-cpp-python` (`open_llama`, `chat_stream`);
- registers a GGUF file with a running Ollama through its REST API (`register_with_ollama`).

nn.Linear keeps its weight as (out, in), row-major. GGUF lists a tensor's sizes the
other way round (innermost first), so that same array reads as {in, out} in GGUF: the
layout llama.cpp's matrix products expect. No weight is transposed.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

import helpers
from course import artifacts

ARCHITECTURE = "gpt2"  # llama.cpp's name for the GPT-2 architecture
LAYER_NORM_EPS = 1e-5  # helpers.LayerNorm's eps
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
TYPES = ("f32", "f16", "q8_0")  # what write_gguf writes
INSTALL_LLAMA_CPP = (
    "pip install llama-cpp-python   (no binary wheel for most machines: pip compiles "
    "llama.cpp, which needs a C++ compiler and CMake and takes 10 minutes or more)"
)
OLLAMA_TIMEOUT_S = 600  # a blob upload or a create of a large model


class ExportError(RuntimeError):
    """The model cannot be exported or run as asked; the message says what to do."""


# -- the tensor names ---------------------------------------------------------------------


def tensor_name_map(n_layers: int) -> list[tuple[str, str]]:
    """(GGUF name, the GPTModel parameter(s) it is made of), in the order they are written.

    GGUF's `attn_qkv` is the three projections W_query, W_key and W_value stacked
    (queries first), so three of the book's parameters become one GGUF tensor.
    """
    rows = [
        ("token_embd.weight", "tok_emb.weight"),
        ("position_embd.weight", "pos_emb.weight"),
    ]
    for b in range(n_layers):
        blk, trf = f"blk.{b}", f"trf_blocks.{b}"
        rows += [
            (f"{blk}.attn_norm.weight", f"{trf}.norm1.scale"),
            (f"{blk}.attn_norm.bias", f"{trf}.norm1.shift"),
            (
                f"{blk}.attn_qkv.weight",
                f"{trf}.att.W_query.weight + W_key.weight + W_value.weight",
            ),
            (f"{blk}.attn_qkv.bias", f"{trf}.att.W_query.bias + W_key.bias + W_value.bias"),
            (f"{blk}.attn_output.weight", f"{trf}.att.out_proj.weight"),
            (f"{blk}.attn_output.bias", f"{trf}.att.out_proj.bias"),
            (f"{blk}.ffn_norm.weight", f"{trf}.norm2.scale"),
            (f"{blk}.ffn_norm.bias", f"{trf}.norm2.shift"),
            (f"{blk}.ffn_up.weight", f"{trf}.ff.layers.0.weight"),
            (f"{blk}.ffn_up.bias", f"{trf}.ff.layers.0.bias"),
            (f"{blk}.ffn_down.weight", f"{trf}.ff.layers.2.weight"),
            (f"{blk}.ffn_down.bias", f"{trf}.ff.layers.2.bias"),
        ]
    rows += [
        ("output_norm.weight", "final_norm.scale"),
        ("output_norm.bias", "final_norm.shift"),
        ("output.weight", "out_head.weight"),
    ]
    return rows


def gguf_arrays(state_dict: dict, n_layers: int) -> dict[str, np.ndarray]:
    """The GPTModel's weights as float32 NumPy arrays under GGUF's names (tensor_name_map).

    `state_dict` is a plain GPTModel state dict (LoRA-merged weights are one too).
    """

    def get(name: str) -> np.ndarray:
        if name not in state_dict:
            raise ExportError(
                f"The weights have no {name!r}: they are not a GPTModel's. Load them with "
                "course.weights.load_model_weights into helpers.GPTModel first."
            )
        return state_dict[name].detach().to("cpu", torch.float32).numpy()

    arrays = {}
    for gguf_name, source in tensor_name_map(n_layers):
        if "+" in source:  # the fused query, key and value projections
            prefix, leaf = source.split(".att.")[0], source.rsplit(".", 1)[1]
            parts = [get(f"{prefix}.att.{w}.{leaf}") for w in ("W_query", "W_key", "W_value")]
            arrays[gguf_name] = np.concatenate(parts, axis=0)
        else:
            arrays[gguf_name] = get(source)
    return arrays


# -- writing GGUF ---------------------------------------------------------------------------


def load_weights(model_name: str, path: str | Path) -> helpers.GPTModel:
    """The fine-tuned GPTModel to export, on the CPU, from a `.pth` file.

    The same loading as notebook 07's (`course.responses.load_fine_tuned`): a missing,
    damaged or mismatched file stops with course.weights' message naming the fix.
    """
    from course import responses

    return responses.load_fine_tuned(model_name, path, "cpu")


def tokenizer_files(folder: str | Path = helpers.TOKENIZER_DIR) -> tuple[list[str], list[str]]:
    """The GPT-2 tokenizer's tokens (in id order) and merges, from encoder.json and vocab.bpe."""
    folder = Path(folder)
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    tokens = [None] * len(encoder)
    for token, index in encoder.items():
        tokens[index] = token
    if any(t is None for t in tokens):
        raise ExportError(f"{folder / 'encoder.json'} has gaps in its token ids: it is damaged.")
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    return tokens, merges


def _tensor_type(name: str, array: np.ndarray, kind: str):
    """The GGML type of one tensor: norms, biases and odd shapes stay f32 (as llama.cpp does)."""
    from gguf import GGMLQuantizationType as T

    if kind == "f32" or array.ndim != 2:
        return T.F32
    if kind == "f16":
        return T.F16
    return T.Q8_0 if array.shape[1] % 32 == 0 else T.F16  # Q8_0 blocks hold 32 numbers


def write_gguf(
    model: torch.nn.Module | dict,
    cfg: dict,
    path: str | Path,
    kind: str = "f16",
    name: str = "gpt2-finetuned",
    tokenizer_dir: str | Path = helpers.TOKENIZER_DIR,
) -> Path:
    """Write a GPTModel (or its state dict) with configuration `cfg` as a GGUF file.

    kind: "f32", "f16" (matrices in 16-bit floats) or "q8_0" (matrices in blocks of 32
    8-bit integers with one f16 scale each, about 8.5 bits a number); layer norms and
    biases stay f32. The file holds the architecture and hyperparameters, the tensors
    and the GPT-2 tokenizer (tokens, merges, <|endoftext|>). It is written to a
    temporary file and renamed, so an interrupted export leaves no half file.
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    if kind not in TYPES:
        raise ExportError(f"kind {kind!r}: use one of {', '.join(TYPES)}.")
    state = model if isinstance(model, dict) else model.state_dict()
    arrays = gguf_arrays(state, cfg["n_layers"])
    tokens, merges = tokenizer_files(tokenizer_dir)
    vocab = arrays["token_embd.weight"].shape[0]
    if vocab != len(tokens):
        raise ExportError(
            f"The model has {vocab} token embeddings, the GPT-2 tokenizer {len(tokens)} "
            "tokens: the GGUF file would not work. Export a GPT-2 model."
        )
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[kind]
    writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
    try:
        writer.add_name(name)
        writer.add_context_length(cfg["context_length"])
        writer.add_embedding_length(cfg["emb_dim"])
        writer.add_feed_forward_length(4 * cfg["emb_dim"])  # helpers.FeedForward
        writer.add_block_count(cfg["n_layers"])
        writer.add_head_count(cfg["n_heads"])
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")  # byte-level BPE
        writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizing regular expression
        writer.add_token_list(tokens)
        token_types = [gguf.TokenType.NORMAL] * len(tokens)
        token_types[END_OF_TEXT_ID] = gguf.TokenType.CONTROL
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(END_OF_TEXT_ID)
        writer.add_eos_token_id(END_OF_TEXT_ID)
        writer.add_add_bos_token(False)  # the course's prompts start without one
        for tensor_name, array in arrays.items():
            ggml_type = _tensor_type(tensor_name, array, kind)
            if ggml_type == T.F16:
                writer.add_tensor(tensor_name, array.astype(np.float16))
            elif ggml_type == T.Q8_0:
                data = gguf.quants.quantize(array, T.Q8_0)
                writer.add_tensor(tensor_name, data, raw_dtype=T.Q8_0)
            else:
                writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException as exc:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise artifacts.ArtifactWriteError(
                f"Could not write {path.name} in {path.parent} ({exc.strerror or exc}). "
                "Nothing was left behind: free some space or set COURSE_ARTIFACTS to a "
                "folder you can write to, and run the cell again."
            ) from None
        raise
    return path


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a GGUF file as float32 arrays (dequantized), in NumPy's order."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        found[tensor.name] = np.asarray(values, dtype=np.float32).reshape(
            tuple(int(n) for n in reversed(tensor.shape))
        )
    return found


def state_dict_from_gguf(path: str | Path, n_layers: int) -> dict[str, torch.Tensor]:
    """A GPTModel state dict from a GGUF file that `write_gguf` wrote (dequantized).

    The way back: `attn_qkv` is split into W_query, W_key and W_value. Loading it
    into helpers.GPTModel runs the exported numbers (f16 or Q8_0 rounding included)
    in PyTorch.
    """
    arrays = read_gguf_tensors(path)
    state = {}
    for gguf_name, source in tensor_name_map(n_layers):
        if gguf_name not in arrays:
            raise ExportError(f"{Path(path).name} has no tensor {gguf_name!r}.")
        array = torch.from_numpy(arrays[gguf_name].copy())
        if "+" in source:
            prefix, leaf = source.split(".att.")[0], source.rsplit(".", 1)[1]
            for part, w in zip(array.chunk(3, dim=0), ("W_query", "W_key", "W_value"), strict=True):
                state[f"{prefix}.att.{w}.{leaf}"] = part.clone()
        else:
            state[source] = array
    return state


def header_bytes(path: str | Path) -> int:
    """How many bytes of a GGUF file come before the tensor data (metadata and tensor table)."""
    import gguf

    return int(gguf.GGUFReader(str(path)).data_offset)


def gguf_metadata(path: str | Path) -> dict:
    """A few metadata fields of a GGUF file: architecture, sizes, tokenizer, file type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    wanted = {
        "general.architecture",
        "general.name",
        "gpt2.context_length",
        "gpt2.embedding_length",
        "gpt2.block_count",
        "gpt2.attention.head_count",
        "gpt2.attention.layer_norm_epsilon",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.eos_token_id",
    }
    found = {}
    for key, field in reader.fields.items():
        if key in wanted:
            found[key] = field.contents()
        elif key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            found[key + " (count)"] = len(field.data)
    return found


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


# -- llama.cpp ------------------------------------------------------------------------------


def llama_cpp_available() -> bool:
    """True when `llama-cpp-python` (the `llama_cpp` module) can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def open_llama(path: str | Path, n_ctx: int = 1024, logits_all: bool = False):
    """Load a GGUF file into llama.cpp (`llama_cpp.Llama`), quietly, on the CPU.

    `logits_all=True` keeps the logits of every position (`llm.scores`), not only the
    last. Without llama-cpp-python it stops with a message saying what to install.
    """
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "llama-cpp-python is not installed, so the GGUF file cannot be run here. "
            f"Install it with: {INSTALL_LLAMA_CPP}. The export itself does not need it."
        ) from None
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=logits_all,
        n_threads=max(1, min(4, os.cpu_count() or 1)),
        verbose=False,
    )


def llama_tokenize(llm, text: str) -> list[int]:
    """llama.cpp's token ids for `text` (no extra start token; <|endoftext|> as special)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_logits(llm, token_ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `token_ids` (needs `logits_all=True`)."""
    llm.reset()
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def llama_greedy(llm, token_ids: list[int], max_new_tokens: int, eos_id: int | None = None):
    """Greedy decoding in llama.cpp: the argmax of the engine's logits, token by token."""
    llm.reset()
    llm.eval(token_ids)
    new = []
    for _ in range(max_new_tokens):
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if next_id == eos_id:
            break
        new.append(next_id)
        llm.eval([next_id])
    return new


def chat_stream(llm, prompt: str, max_tokens: int, stop: list[str]) -> Iterator[str]:
    """The model's answer to a full prompt, streamed by llama.cpp piece by piece (greedy)."""
    for chunk in llm.create_completion(
        prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=1,
        repeat_penalty=1.0,
        stop=stop,
        stream=True,
    ):
        yield chunk["choices"][0]["text"]


# -- Ollama ---------------------------------------------------------------------------------


def ollama_version(host: str | None = None, timeout: float = 5) -> str | None:
    """The version of the Ollama server at `host` (OLLAMA_HOST), or None if none answers.

    None also when something else answers there (not Ollama's /api/version). An
    OLLAMA_HOST that is no address at all raises course.judge's JudgeError, which says
    what to write instead.
    """
    import http.client

    from course import judge

    base_url = judge.ollama_host(host)
    try:
        version = judge.ollama_get(base_url, "/api/version", timeout)["version"]
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        return None  # URLError and timeouts are OSErrors; a foreign answer fails to parse
    return version if isinstance(version, str) else None


def _request(method: str, url: str, data=None, headers=None, timeout=OLLAMA_TIMEOUT_S):
    from course import judge

    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with judge.ollama_urlopen(request, timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _error_of(body: bytes) -> str:
    try:
        return json.loads(body.decode("utf-8")).get("error") or body.decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")


def push_blob(base_url: str, path: str | Path) -> str:
    """Upload a file to Ollama as a blob (unless it is there); return its digest.

    HEAD /api/blobs/sha256:<digest> asks whether Ollama has it (200) or not (404);
    POST /api/blobs/sha256:<digest> with the file's bytes creates it (201), and Ollama
    answers 400 when the bytes do not have that digest.
    """
    path = Path(path)
    digest = "sha256:" + artifacts.sha256_of_file(path)
    status, _ = _request("HEAD", f"{base_url}/api/blobs/{digest}")
    if status == 200:
        return digest
    size = path.stat().st_size
    with open(path, "rb") as f:
        status, body = _request(
            "POST",
            f"{base_url}/api/blobs/{digest}",
            data=f,
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
    if status not in (200, 201):
        raise ExportError(f"Ollama did not take {path.name} (HTTP {status}: {_error_of(body)}).")
    return digest


def create_model(
    base_url: str, name: str, files: dict[str, str], template_text: str, parameters: dict
) -> list[str]:
    """POST /api/create: a model from uploaded GGUF blobs, a template and parameters.

    Returns Ollama's status lines, which it streams as it works ("parsing GGUF", ...,
    "success"); an error stops with Ollama's message.
    """
    body = {
        "model": name,
        "files": files,
        "template": template_text,
        "parameters": parameters,
    }
    status, raw = _request(
        "POST",
        f"{base_url}/api/create",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    if status != 200:
        raise ExportError(f"Ollama could not create {name!r} (HTTP {status}: {_error_of(raw)}).")
    lines = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    errors = [line["error"] for line in lines if "error" in line]
    if errors:
        raise ExportError(f"Ollama could not create {name!r}: {errors[0]}")
    return [line.get("status", "") for line in lines]


def register_with_ollama(
    gguf_path: str | Path,
    name: str,
    style: str,
    context_length: int,
    host: str | None = None,
) -> list[str]:
    """Upload a GGUF file to Ollama and create model `name` with the run's template.

    The same model that `ollama create <name> -f <Modelfile>` builds. Returns Ollama's
    status lines.
    """
    from course import judge

    base_url = judge.ollama_host(host)
    digest = push_blob(base_url, gguf_path)
    return create_model(
        base_url,
        name,
        {Path(gguf_path).name: digest},
        template(style),
        ollama_parameters(style, context_length),
    )


def ollama_model_name(stem: str) -> str:
    """A name Ollama accepts for the exported model: lower case, e.g. "gpt2-medium355m-sft"."""
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "course-model"
