"""Writing and reading GGUF files, llama.cpp's one-file model format (notebook 11).

The book's GPTModel under llama.cpp's `gpt2` tensor names, its hyperparameters and the
GPT-2 tokenizer, in f32, f16 or Q8_0; and the way back, for the notebook's checks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

import helpers
from course import artifacts
from course.export import END_OF_TEXT_ID, ExportError

ARCHITECTURE = "gpt2"  # llama.cpp's name for the GPT-2 architecture
LAYER_NORM_EPS = 1e-5  # helpers.LayerNorm's eps
TYPES = ("f32", "f16", "q8_0")  # what write_gguf writes
# llama.cpp changes how it loads a vocabulary when general.name contains one of these
# (lower case): "phi-3"/"phi3" look up Phi-3's "</s>", which GPT-2's vocabulary lacks
NAMES_LLAMA_CPP_KEYS_ON = ("phi-3", "phi3", "modern-bert")
RUN_KEY = "course.run"  # the run a file was exported from (llama.cpp ignores the key)
COMPARISON_FOLDER = "gguf-comparison"  # notebook 11's scratch files, under artifacts/


# -- the tensor names ---------------------------------------------------------------------


def tensor_name_map(n_layers: int) -> list[tuple[str, str]]:
    """(GGUF name, the GPTModel parameter(s) it is made of), in the order they are written.

    GGUF's `attn_qkv` is the three projections W_query, W_key and W_value stacked
    (queries first), so three of the book's parameters become one GGUF tensor.
    nn.Linear keeps its weight as (out, in), row-major; GGUF lists sizes innermost
    first, so the same array reads as {in, out}: the layout llama.cpp's matrix
    products expect. No weight is transposed.
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


# -- writing --------------------------------------------------------------------------------


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


def general_name(run_name: str) -> str:
    """The file's `general.name`: the run's name without the words llama.cpp keys on.

    llama.cpp loads a vocabulary differently when the name holds "phi3" (it then looks
    up Phi-3's `</s>`, which GPT-2 lacks, and refuses the file), so a phi3 run's file is
    named without its prompt style; the run itself goes into `general.description`.
    """
    name, previous = run_name, None
    while name != previous:
        previous = name
        for word in NAMES_LLAMA_CPP_KEYS_ON:
            name = re.sub(re.escape(word), "", name, flags=re.IGNORECASE)
    name = re.sub(r"-{2,}", "-", name).strip("-_. ")
    return name or "gpt2-finetuned"


def _tensor_type(array: np.ndarray, kind: str):
    """The GGML type of one tensor: norms, biases and odd shapes stay f32 (as llama.cpp does)."""
    from gguf import GGMLQuantizationType as T

    if kind == "f32" or array.ndim != 2:
        return T.F32
    if kind == "f16":
        return T.F16
    return T.Q8_0 if array.shape[1] % 32 == 0 else T.F16  # Q8_0 blocks hold 32 numbers


def _writer_into(f, arch: str):
    """A gguf.GGUFWriter that writes into the open binary file `f` (not a path of its own)."""
    import gguf
    from gguf.gguf_writer import WriterState

    class IntoFile(gguf.GGUFWriter):
        def open_output_file(self, path=None) -> None:
            if self.state is WriterState.NO_FILE:
                self.fout, self.state = [f], WriterState.EMPTY

    return IntoFile(None, arch)


def _add_metadata(writer, cfg: dict, kind: str, run_name: str, tokenizer: tuple) -> None:
    """The header: the run, the hyperparameters and the GPT-2 tokenizer."""
    import gguf

    tokens, merges = tokenizer
    writer.add_name(general_name(run_name))
    writer.add_description(f"GPT-2 fine-tuned by the course's run {run_name}")
    writer.add_string(RUN_KEY, run_name)
    writer.add_context_length(cfg["context_length"])
    writer.add_embedding_length(cfg["emb_dim"])
    writer.add_feed_forward_length(4 * cfg["emb_dim"])  # helpers.FeedForward
    writer.add_block_count(cfg["n_layers"])
    writer.add_head_count(cfg["n_heads"])
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[kind]
    )
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


def _add_tensors(writer, arrays: dict[str, np.ndarray], kind: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType as T

    for tensor_name, array in arrays.items():
        ggml_type = _tensor_type(array, kind)
        if ggml_type == T.F16:
            writer.add_tensor(tensor_name, array.astype(np.float16))
        elif ggml_type == T.Q8_0:
            data = gguf.quants.quantize(array, T.Q8_0)
            writer.add_tensor(tensor_name, data, raw_dtype=T.Q8_0)
        else:
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))


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
    biases stay f32. `name` is the run the model comes from; the file's `general.name`
    is `general_name(name)`. The file holds the hyperparameters, the tensors and the
    GPT-2 tokenizer. It is written as every artifact is (course.artifacts.open_atomic):
    an interrupted or killed export leaves no half file behind for long, and a full or
    read-only disk stops with a message saying what to do.
    """
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
    with artifacts.open_atomic(path) as f:
        writer = _writer_into(f, ARCHITECTURE)
        _add_metadata(writer, cfg, kind, name, (tokens, merges))
        _add_tensors(writer, arrays, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path


def comparison_folder(root: str | Path | None = None) -> Path:
    """Notebook 11's folder for the files it only compares, emptied first.

    It lies under the artifacts folder (`root`), so a notebook stopped before its
    clean-up leaves its files where the next run removes them.
    """
    folder = Path(root or artifacts.artifacts_dir()) / COMPARISON_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- reading --------------------------------------------------------------------------------


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
    """A few metadata fields of a GGUF file: the run, architecture, sizes, tokenizer."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    wanted = {
        "general.architecture",
        "general.name",
        RUN_KEY,
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
