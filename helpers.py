"""Everything the nine notebooks share, in the order the notebooks use it.

The names and signatures follow chapter 7 of *Build a Large Language Model (From
Scratch)*, so you can move between the book and this course. Read it top to bottom:

1. settings and artifacts     (every notebook)
2. the dataset                (notebook 01)
3. the tokenizer              (notebook 01, 02)
4. batching                   (notebooks 02, 03)
5. the GPT model              (notebook 04)
6. generating text            (notebooks 04, 05, 07)
7. pretrained weights         (notebook 04)
8. training                   (notebooks 05, 06)
9. scoring with an LLM judge  (notebook 09)
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# 1. Settings and artifacts
# ---------------------------------------------------------------------------


def setting(name: str, default: Any) -> Any:
    """Return environment variable `name` converted to the type of `default`.

    The parameters cell of every notebook reads its values through this, so a run
    can be changed without editing a notebook: `COURSE_EPOCHS=1 jupyter lab`.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        if isinstance(default, bool):
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"Environment variable {name}={raw!r} is not a valid "
            f"{type(default).__name__} (default: {default!r}). Fix or unset it."
        ) from None
    return raw


def artifacts_dir() -> Path:
    """The folder where notebooks hand results to each other (COURSE_ARTIFACTS)."""
    path = Path(setting("COURSE_ARTIFACTS", str(HERE / "artifacts")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename.

    An interrupted write leaves either the old file or none, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a new name next to the target ("x": never an existing file); unlike mkstemp's
    # private 0600 files, open() gives the file the usual permissions
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{time.time_ns()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def require_artifact(path: str | Path, notebook: str) -> Path:
    """Stop with a clear message when an earlier notebook's output is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path.name} was not found in {path.parent}. It is written by notebook "
            f"{notebook}: run that notebook first (with the same COURSE_* settings)."
        )
    return path


def sha256_of_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def choose_device(prefer: str = "auto") -> torch.device:
    """cuda if there is an NVIDIA GPU, else mps on Apple silicon, else cpu.

    `prefer` ("cuda", "mps", "cpu") forces a choice (COURSE_DEVICE). MPS is used only
    with PyTorch 2.9 or newer: older versions give wrong losses for this chapter.
    """
    if prefer not in ("auto", "cuda", "mps", "cpu"):
        raise ValueError(f'device {prefer!r}: use "auto", "cuda", "mps" or "cpu".')
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if prefer in ("auto", "mps") and torch.backends.mps.is_available():
        if torch_version_at_least(torch.__version__, (2, 9)):
            return torch.device("mps")
        print(
            f"Apple GPU (mps) found, but PyTorch {torch.__version__} computes this "
            "chapter's losses wrongly on it (19.9 where the CPU gives 3.8): using the "
            "CPU. Install torch>=2.9 to train on the Apple GPU."
        )
    elif prefer != "auto":
        print(f"{prefer} was asked for but is not available: using the CPU.")
    return torch.device("cpu")


def torch_version_at_least(version: str, minimum: tuple[int, int]) -> bool:
    """True when a version string such as "2.9.1+cpu" is at least `minimum`."""
    numbers = re.findall(r"\d+", version)[:2]
    return tuple(int(n) for n in numbers) >= minimum


# ---------------------------------------------------------------------------
# 2. The dataset (notebook 01)
# ---------------------------------------------------------------------------

DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)
DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"


class DatasetError(ValueError):
    """The instruction dataset file is not what the course expects."""


def validate_instruction_data(data: Any, source: str) -> list[dict]:
    """Check that `data` is a list of entries with string instruction/input/output."""
    if not isinstance(data, list):
        raise DatasetError(
            f"{source}: expected a JSON list of entries, got a JSON {type(data).__name__}. "
            "Delete the file and run the cell again to download a fresh copy."
        )
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DatasetError(
                f"{source}: entry {index} is of type {type(entry).__name__}, not an object "
                'with "instruction", "input" and "output". Fix or remove that entry.'
            )
        for field in ("instruction", "input", "output"):
            if field not in entry:
                raise DatasetError(
                    f'{source}: entry {index} has no "{field}" field. '
                    f'Every entry needs "instruction", "input" (may be "") and "output".'
                )
            if not isinstance(entry[field], str):
                raise DatasetError(
                    f'{source}: entry {index}, field "{field}" is of type '
                    f"{type(entry[field]).__name__}, not a string. Fix that entry."
                )
    return data


def download_and_load_file(
    file_path: str | Path, url: str, expected_sha256: str | None = None
) -> list[dict]:
    """Download the dataset when `file_path` is missing, then load and validate it.

    A download from the book's DATA_URL must match DATA_SHA256 (pass
    `expected_sha256` to check a copy from elsewhere). An interrupted download
    continues where it stopped when the cell runs again.
    """
    file_path = Path(file_path)
    if not file_path.exists():
        if expected_sha256 is None and url == DATA_URL:
            expected_sha256 = DATA_SHA256
        try:
            download_file(url, file_path, show_progress=False, expected_sha256=expected_sha256)
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            raise ConnectionError(
                f"Could not download {url}: {describe_network_error(exc, url)}\n"
                f"Run the cell again (it resumes), or download the file by hand and save "
                f"it as {file_path}."
            ) from exc
        except ValueError as exc:  # the checksum did not match
            raise DatasetError(str(exc)) from None
    text = file_path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{file_path}: not valid JSON ({exc.msg}: line {exc.lineno}, column "
            f"{exc.colno}). Delete the file and run the cell again to download it anew."
        ) from None
    return validate_instruction_data(data, str(file_path))


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The prompt for one entry: instruction and optional input, without the response.

    style="alpaca" is the book's default; style="phi3" is exercise 7.1's
    `<|user|>` / `<|assistant|>` format.
    """
    if style == "alpaca":
        text = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}"
        )
        if entry["input"]:
            text += f"\n\n### Input:\n{entry['input']}"
        return text
    if style == "phi3":
        text = f"<|user|>\n{entry['instruction']}"
        if entry["input"]:
            text += f"\n{entry['input']}"
        return text
    raise ValueError(f'Unknown prompt style {style!r}: use "alpaca" or "phi3".')


def format_response(entry: dict, style: str = "alpaca") -> str:
    """The text that follows the prompt during training: the response marker and output."""
    if style == "alpaca":
        return f"\n\n### Response:\n{entry['output']}"
    if style == "phi3":
        return f"\n<|assistant|>:\n{entry['output']}"
    raise ValueError(f'Unknown prompt style {style!r}: use "alpaca" or "phi3".')


def split_data(data: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The book's split, in file order: 85% train, 5% validation, 10% test.

    For 1,100 entries: 935 train, 55 validation, 110 test.
    """
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    train_data = data[:train_portion]
    test_data = data[train_portion : train_portion + test_portion]
    val_data = data[train_portion + test_portion :]
    return train_data, val_data, test_data


def data_fingerprint(data: list[dict]) -> str:
    """A SHA-256 of the entries' content, to tell later whether the dataset changed."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def split_path() -> Path:
    """Where notebook 01 saves the split."""
    return artifacts_dir() / "split.json"


def save_split(data: list[dict], path: str | Path | None = None) -> dict:
    """Split `data` and save the three parts with the source's fingerprint."""
    train_data, val_data, test_data = split_data(data)
    split = {
        "source_fingerprint": data_fingerprint(data),
        "train": train_data,
        "val": val_data,
        "test": test_data,
    }
    write_json_atomic(path or split_path(), split)
    return split


def load_split(
    path: str | Path | None = None, data_file: str | Path | None = None
) -> tuple[list[dict], list[dict], list[dict]]:
    """Load notebook 01's split; stop if it is missing or the dataset has changed since."""
    path = require_artifact(path or split_path(), "01_dataset_download_and_formatting")
    split = json.loads(Path(path).read_text(encoding="utf-8"))
    data_file = Path(data_file or HERE / "instruction-data.json")
    if data_file.exists():
        current = data_fingerprint(json.loads(data_file.read_text(encoding="utf-8")))
        if current != split.get("source_fingerprint"):
            raise RuntimeError(
                f"{data_file.name} has changed since the split in {path} was made. "
                "Run notebook 01_dataset_download_and_formatting again to redo the split."
            )
    return split["train"], split["val"], split["test"]


# ---------------------------------------------------------------------------
# 3. The tokenizer (notebooks 01, 02)
# ---------------------------------------------------------------------------

TOKENIZER_DIR = HERE / "gpt2-tokenizer"


def get_tokenizer(files_dir: str | Path = TOKENIZER_DIR):
    """GPT-2's BPE tokenizer built from the shipped files, with no network.

    Gives the same ids as `tiktoken.get_encoding("gpt2")`; `<|endoftext|>` is 50256.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    files_dir = Path(files_dir)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files_dir / "vocab.bpe"),
        encoder_json_file=str(files_dir / "encoder.json"),
        # OpenAI's published sums: a damaged file (or a stale cached copy) is refused
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


# ---------------------------------------------------------------------------
# 4. Batching (notebooks 02, 03)
# ---------------------------------------------------------------------------


class InstructionDataset(Dataset):
    """Pretokenizes every entry as prompt + response.

    With `with_prompt_length=True` each item is `(token_ids, prompt_length)`, which
    `custom_collate_fn(..., mask_instructions=True)` uses to hide the prompt from the
    loss (exercise 7.2).
    """

    def __init__(
        self, data: list[dict], tokenizer, style: str = "alpaca", with_prompt_length: bool = False
    ):
        self.data = data
        self.with_prompt_length = with_prompt_length
        self.encoded_texts = []
        self.prompt_lengths = []
        for entry in data:
            prompt = format_input(entry, style)
            full_text = prompt + format_response(entry, style)
            self.encoded_texts.append(tokenizer.encode(full_text))
            self.prompt_lengths.append(len(tokenizer.encode(prompt)))

    def __getitem__(self, index: int):
        if self.with_prompt_length:
            return self.encoded_texts[index], self.prompt_lengths[index]
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def custom_collate_fn(
    batch: list,
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
    device: str | torch.device = "cpu",
    mask_instructions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch, shift targets by one, replace padding in the targets by -100.

    Each sequence gets one `<|endoftext|>`; the first padding position of a target
    keeps it (so the model learns to stop), the others become `ignore_index`.
    With `mask_instructions=True` the items must be `(token_ids, prompt_length)`
    pairs, and the targets that are prompt tokens become `ignore_index` too.
    """
    if mask_instructions:
        if not all(isinstance(item, tuple) for item in batch):
            raise ValueError(
                "mask_instructions=True needs (token_ids, prompt_length) items: "
                "build the dataset with InstructionDataset(..., with_prompt_length=True)."
            )
        sequences = [list(item[0]) for item in batch]
        prompt_lengths = [item[1] for item in batch]
    else:
        sequences = [list(item[0]) if isinstance(item, tuple) else list(item) for item in batch]
        prompt_lengths = [0] * len(batch)

    batch_max_length = max(len(seq) + 1 for seq in sequences)
    inputs_lst, targets_lst = [], []
    for seq, prompt_length in zip(sequences, prompt_lengths, strict=True):
        padded = seq + [pad_token_id] * (batch_max_length - len(seq))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        # positions after the first pad token are ignored by the loss
        padding = targets == pad_token_id
        pad_positions = torch.nonzero(padding).squeeze(1)
        if pad_positions.numel() > 1:
            targets[pad_positions[1:]] = ignore_index
        if prompt_length > 1:
            targets[: prompt_length - 1] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


# ---------------------------------------------------------------------------
# 5. The GPT model (notebook 04)
# ---------------------------------------------------------------------------

BASE_CONFIG = {
    "vocab_size": 50257,  # vocabulary size
    "context_length": 1024,  # context length
    "drop_rate": 0.0,  # dropout rate
    "qkv_bias": True,  # query-key-value bias
}

MODEL_CONFIGS = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
    # random weights, written on this machine: for CI and dry runs, answers are noise
    "offline (tiny)": {"emb_dim": 64, "n_layers": 2, "n_heads": 2},
}

OFFLINE_MODEL = "offline (tiny)"


def resolve_model_name(name: str) -> str:
    """Accept "gpt2-medium", "gpt2-medium (355M)", "355M" or "offline"."""
    for full_name in MODEL_CONFIGS:
        short = full_name.split(" ")[0]
        size = full_name.split("(")[1].rstrip(")")
        if name in (full_name, short, size):
            return full_name
    raise ValueError(
        f"Unknown model {name!r}. Choose one of: "
        + ", ".join(f'"{n.split(" ")[0]}"' for n in MODEL_CONFIGS)
    )


def model_config(name: str) -> dict:
    """The full GPTModel configuration for a model name."""
    return {**BASE_CONFIG, **MODEL_CONFIGS[resolve_model_name(name)]}


def model_file_stem(name: str) -> str:
    """The book's file naming: "gpt2-medium (355M)" -> "gpt2-medium355M"."""
    return re.sub(r"[ ()]", "", resolve_model_name(name))


class KVCache:
    """Keys and values of every transformer block for the tokens processed so far.

    During generation the keys and values of earlier tokens never change, so they are
    computed once and kept here; each step then feeds only the newest token. Space for
    `max_len` tokens is reserved on first use (in the dtype the model computes in), so
    each step writes in place instead of copying the whole cache.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens stored so far; GPTModel.forward advances it
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store the new tokens' (batch, heads, tokens, head_dim) keys and values of
        block `layer`; return the keys and values of all tokens so far."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"This KVCache holds {self.max_len} tokens, {end} were fed: make it larger."
            )
        if self.keys[layer] is None:
            b, h, _, d = keys.shape
            self.keys[layer] = keys.new_empty(b, h, self.max_len, d)
            self.values[layer] = values.new_empty(b, h, self.max_len, d)
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (indices), for example when the others have finished."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]


_CAUSAL_MASKS: dict[int, torch.Tensor] = {}


def shared_causal_mask(context_length: int) -> torch.Tensor:
    """The book's causal mask (ones above the diagonal), one tensor per context length.

    The mask never changes, so the attention modules of fast models all hold this same
    tensor instead of a copy each (it stays in every module's state_dict).
    """
    if context_length not in _CAUSAL_MASKS:
        mask = torch.ones(context_length, context_length).triu_(diagonal=1)
        _CAUSAL_MASKS[context_length] = mask
    return _CAUSAL_MASKS[context_length]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention, with the book's parameter names.

    `fast=True` computes the same attention with PyTorch's fused
    `scaled_dot_product_attention`; `fast=False` is the book's step-by-step math.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, fast=True):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"emb_dim {d_out} must be divisible by n_heads {num_heads}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.fast = fast
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # kept so that a .pth saved by the book's code loads here and back; fast
        # modules share one copy (gpt2-medium has 24 blocks: 96 MB saved)
        if fast:
            mask = shared_causal_mask(context_length)
        else:
            mask = torch.ones(context_length, context_length).triu_(diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, attn_mask=None):
        """Attention over (batch, tokens, d_in).

        With a `cache`, `x` holds only the new tokens; they attend to the cached ones too.
        `attn_mask` (bool, True where a query may look at a key, shaped (batch, 1, new
        tokens, all tokens)) replaces the causal mask: generate_batch uses it to hide padding.
        """
        b, num_tokens, _ = x.shape
        # (b, tokens, d_out) -> (b, heads, tokens, head_dim)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        start = 0  # position of the first new token
        if cache is not None:
            start = cache.length
            keys, values = cache.update(layer, keys, values)

        if self.fast:
            context = self.fused_attention(queries, keys, values, start, attn_mask)
        else:
            attn_scores = queries @ keys.transpose(2, 3)
            if attn_mask is None:
                mask_bool = self.mask.bool()[start : start + num_tokens, : start + num_tokens]
            else:
                mask_bool = ~attn_mask
            attn_scores.masked_fill_(mask_bool, -torch.inf)
            attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)
            attn_weights = self.dropout(attn_weights)
            context = attn_weights @ values

        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)

    def fused_attention(self, queries, keys, values, start, attn_mask):
        """softmax(QK^T / sqrt(head_dim) + mask) V in one fused PyTorch kernel."""
        dropout_p = self.dropout.p if self.training else 0.0
        num_tokens = queries.shape[2]
        if attn_mask is None and start == 0:  # plain causal attention
            return nn.functional.scaled_dot_product_attention(
                queries, keys, values, dropout_p=dropout_p, is_causal=num_tokens > 1
            )
        if attn_mask is None and num_tokens > 1:  # new tokens after cached ones
            attn_mask = self.mask[start : start + num_tokens, : start + num_tokens] == 0
        # (one new token after cached ones may look at every key: no mask needed)
        return nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p
        )


class LayerNorm(nn.Module):
    """Layer normalization with the book's `scale` and `shift` parameters.

    `fast=True` uses PyTorch's fused `layer_norm` kernel: the same formula, one pass.
    """

    def __init__(self, emb_dim, fast=True):
        super().__init__()
        self.eps = 1e-5
        self.fast = fast
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        if self.fast:
            return nn.functional.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU (`fast=True`: PyTorch's fused kernel for it)."""

    def __init__(self, fast=True):
        super().__init__()
        self.fast = fast

    def forward(self, x):
        if self.fast:
            return nn.functional.gelu(x, approximate="tanh")
        return 0.5 * x * (1 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


class FeedForward(nn.Module):
    """Expand to 4 x emb_dim, GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(fast=cfg.get("fast", True)),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward, each with a shortcut connection."""

    def __init__(self, cfg):
        super().__init__()
        fast = cfg.get("fast", True)
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
            fast=fast,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"], fast=fast)
        self.norm2 = LayerNorm(cfg["emb_dim"], fast=fast)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, attn_mask=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer, attn_mask))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token and position embeddings, transformer blocks, final norm, output head.

    `cfg["fast"]` (default True) picks PyTorch's fused kernels for attention, layer norm
    and GELU; False runs the book's step-by-step math. Both compute the same function
    with the same parameters, so either loads the other's weights.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.fast = cfg.get("fast", True)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"], fast=self.fast)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for token ids (batch, tokens).

        The optional arguments serve the fast paths: `cache` keeps keys and values
        between calls (generation), `positions` gives each token's position when it is
        not 0, 1, 2, ... (left-padded batches), `attn_mask` replaces the causal mask, and
        `return_hidden=True` returns the input of `out_head` (batch, tokens, emb_dim), so
        that the caller computes logits only where it needs them.
        """
        _, seq_len = in_idx.shape
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + seq_len, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)
        x = self.drop_emb(x)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache, layer, attn_mask)
        if cache is not None:
            cache.length += seq_len
        x = self.final_norm(x)
        return x if return_hidden else self.out_head(x)


# -- Memory a model needs (notebook 04) ----------------------------------------


def count_parameters(cfg: dict) -> int:
    """The number of parameters of `GPTModel(cfg)`, computed without building it.

    As in the book, the output head is a matrix of its own (not shared with the token
    embedding), so GPT-2 medium, "355M" in OpenAI's count, has 406,286,336 here.
    """
    d, vocab = cfg["emb_dim"], cfg["vocab_size"]
    attention = 3 * d * d + (3 * d if cfg["qkv_bias"] else 0) + d * d + d
    feed_forward = d * 4 * d + 4 * d + 4 * d * d + d
    layer_norms = 2 * 2 * d
    block = attention + feed_forward + layer_norms
    embeddings = vocab * d + cfg["context_length"] * d
    return embeddings + cfg["n_layers"] * block + 2 * d + d * vocab


def memory_needed(cfg: dict, batch_size: int = 8, seq_len: int = 92) -> dict:
    """Rough bytes for using and for fine-tuning `GPTModel(cfg)` in fp32.

    Using it needs the weights (4 bytes per parameter). Fine-tuning with AdamW needs
    four times that (weights, gradients and AdamW's two running averages) plus the
    activations kept for the backward pass: a rule of thumb per layer, and the logits
    (batch x tokens x 50,257) three times over. The book's longest training sequence
    has 92 tokens.
    """
    params = count_parameters(cfg)
    weights = 4 * params
    tokens = batch_size * seq_len
    per_layer = tokens * (34 * cfg["emb_dim"] + 5 * cfg["n_heads"] * seq_len) * 2
    activations = cfg["n_layers"] * per_layer + 3 * 4 * tokens * cfg["vocab_size"]
    return {"parameters": params, "weights": weights, "training": 4 * weights + activations}


def memory_available(device: str | torch.device) -> dict:
    """Total and free memory where the model will live: GPU memory on cuda, else RAM."""
    import psutil

    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "where": f"GPU memory ({torch.cuda.get_device_name(device)})",
            "total": total,
            "free": free,
        }
    ram = psutil.virtual_memory()
    where = "memory (RAM, shared with the Apple GPU)" if device.type == "mps" else "memory (RAM)"
    return {"where": where, "total": ram.total, "free": ram.available}


def check_memory(model_name: str, device: str | torch.device, batch_size: int = 8) -> str | None:
    """Print what `model_name` needs against what this machine has.

    Returns None when fine-tuning fits, else the largest GPT-2 size that fits (or
    the offline model), as a suggestion.
    """
    name = resolve_model_name(model_name)
    need = memory_needed(model_config(name), batch_size)
    have = memory_available(device)
    gb = 1024**3
    print(
        f"This machine: {have['total'] / gb:.1f} GB {have['where']}, {have['free'] / gb:.1f} GB free."
    )
    print(
        f"{name}: about {need['weights'] / gb:.1f} GB to generate, about "
        f"{need['training'] / gb:.1f} GB to fine-tune (batch size {batch_size})."
    )
    if need["training"] <= have["free"]:
        print("Fine-tuning fits.")
        return None
    fitting = [
        other
        for other in MODEL_CONFIGS
        if memory_needed(model_config(other), batch_size)["training"] <= have["free"]
    ]
    smaller = [n for n in fitting if n != OFFLINE_MODEL]
    suggestion = smaller[-1] if smaller else OFFLINE_MODEL
    print(
        f"Fine-tuning {name} probably does not fit: close other programs, use a smaller "
        f'batch size, or choose a smaller model, for example COURSE_MODEL="{suggestion.split(" ")[0]}".'
    )
    return suggestion


# ---------------------------------------------------------------------------
# 6. Generating text (notebooks 04, 05, 07)
# ---------------------------------------------------------------------------


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Encode `text` as a (1, n) tensor of token ids."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Decode a (1, n) or (n,) tensor of token ids."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


RESPONSE_MARKERS = {"alpaca": "### Response:", "phi3": "<|assistant|>:"}


def extract_response(generated_text: str, input_text: str, style: str = "alpaca") -> str:
    """The book's extraction: cut the prompt, drop the response marker, strip spaces."""
    if style not in RESPONSE_MARKERS:
        raise ValueError(f'Unknown prompt style {style!r}: use "alpaca" or "phi3".')
    return generated_text[len(input_text) :].replace(RESPONSE_MARKERS[style], "").strip()


def next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None
) -> torch.Tensor:
    """The book's choice of the next token from last-position logits (batch, vocab).

    Greedy (argmax) when temperature is 0; otherwise keep the `top_k` largest logits,
    divide by the temperature and sample. Returns (batch, 1) token ids.
    """
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)
        min_val = top_logits[:, -1:]
        minus_inf = torch.tensor(float("-inf"), device=logits.device)
        logits = torch.where(logits < min_val, minus_inf, logits)
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """The book's generation loop: one full forward pass per new token.

    Greedy when temperature is 0; otherwise top-k filtering, temperature scaling and
    sampling. Stops early when the model produces `eos_id`.
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        idx_next = next_token(logits[:, -1, :], temperature, top_k)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def last_token_logits(model: GPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (batch, vocab) of the last position only, from hidden states (batch,
    tokens, emb_dim): `model.out_head(hidden[:, -1, :])`.

    Computed as W @ h^T, the same products: for a few rows, CPU matrix libraries run
    this orientation of the largest matrix product up to twice as fast.
    """
    last = hidden[:, -1, :]
    return (model.out_head.weight @ last.T).T


def _require_gpt_model(model: nn.Module, function: str) -> None:
    if not isinstance(model, GPTModel):
        raise TypeError(
            f"{function} needs a helpers.GPTModel (it uses its key/value cache), got a "
            f"{type(model).__name__}. Use helpers.generate for other models."
        )


@torch.no_grad()
def generate_fast(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """`generate` with a key/value cache: the same tokens, many times faster.

    `generate` runs the whole text through the model for every new token. Here the
    prompt runs once, filling a KVCache, and then each step feeds only the newest
    token. Once the text is longer than `context_size`, the window slides, every
    token's position changes and cached keys no longer fit, so from then on each step
    recomputes the window exactly like `generate`. Greedy output equals `generate`'s;
    sampling (temperature > 0) follows the same distribution.
    """
    _require_gpt_model(model, "generate_fast")
    if idx.dim() != 2:
        raise ValueError(
            f"idx must be (batch, tokens), got shape {tuple(idx.shape)}: use idx.unsqueeze(0)."
        )
    cache = None
    for _ in range(max_new_tokens):
        if idx.shape[1] > context_size:  # sliding window: like generate
            hidden = model(idx[:, -context_size:], return_hidden=True)
        elif cache is None:  # the prompt, once
            cache_len = min(context_size, idx.shape[1] + max_new_tokens - 1)
            cache = KVCache(len(model.trf_blocks), cache_len)
            hidden = model(idx, cache=cache, return_hidden=True)
        else:  # only the newest token
            hidden = model(idx[:, -1:], cache=cache, return_hidden=True)
        logits = last_token_logits(model, hidden)
        idx_next = next_token(logits, temperature, top_k)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


@torch.no_grad()
def generate_batch(
    model: GPTModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    context_size: int,
    eos_id: int | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy continuations of many prompts, `batch_size` at a time, with a KVCache.

    Returns, for each prompt, the new tokens only: exactly those that `generate` appends
    to that prompt alone (without the final `eos_id`). Prompts are sorted by length so
    that a batch needs little padding; shorter ones are padded on the left, and
    per-row positions and an attention mask make the padding invisible. A row that
    produces `eos_id` stops and leaves the batch. Prompts that would outgrow
    `context_size` go through `generate_fast` one at a time (their window slides).
    """
    _require_gpt_model(model, "generate_batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"Prompt {i} is empty: every prompt needs at least one token.")
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return results
    device = model.pos_emb.weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batched = []
    for i in order:
        if len(prompts[i]) + max_new_tokens - 1 <= context_size:
            batched.append(i)
        else:
            idx = torch.tensor([list(prompts[i])], device=device)
            out = generate_fast(model, idx, max_new_tokens, context_size, eos_id=eos_id)
            results[i] = out[0, len(prompts[i]) :].tolist()
    for first in range(0, len(batched), batch_size):
        rows = batched[first : first + batch_size]
        batch = [prompts[i] for i in rows]
        new_tokens = _generate_left_padded(model, batch, max_new_tokens, eos_id)
        for i, tokens in zip(rows, new_tokens, strict=True):
            results[i] = tokens
    return results


def _generate_left_padded(model, prompts, max_new_tokens, eos_id):
    """One batch of generate_batch: greedy, cached, rows leave when they produce eos_id."""
    device = model.pos_emb.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pad = width - lengths  # padding tokens in front of each row
    idx = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt) :] = torch.tensor(list(prompt), device=device)

    total = width + max_new_tokens - 1  # tokens the cache will hold
    cols = torch.arange(total, device=device)
    key_is_real = cols[None, :] >= pad[:, None]  # (rows, total): False on padding
    # prompt: causal attention over real tokens; a padding token attends to itself
    # only (its output is never used, but must not be NaN)
    q = cols[:width, None]
    k = cols[None, :width]
    mask = (k <= q) & (key_is_real[:, None, :width] | (k == q))
    positions = (cols[None, :width] - pad[:, None]).clamp(min=0)

    cache = KVCache(len(model.trf_blocks), total)
    hidden = model(
        idx, cache=cache, positions=positions, attn_mask=mask[:, None], return_hidden=True
    )
    active = list(range(len(prompts)))  # which prompts the batch rows are
    next_position = lengths.clone()
    new_tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        idx_next = last_token_logits(model, hidden).argmax(dim=-1)
        finished = [False] * len(active)
        for row, token in enumerate(idx_next.tolist()):
            if eos_id is not None and token == eos_id:
                finished[row] = True
            else:
                new_tokens[active[row]].append(token)
        if step == max_new_tokens - 1 or all(finished):
            break
        if any(finished):
            keep = torch.tensor([not f for f in finished], device=device)
            rows = keep.nonzero().squeeze(1)
            cache.keep_rows(rows)
            idx_next, next_position = idx_next[rows], next_position[rows]
            key_is_real = key_is_real[rows]
            active = [a for a, f in zip(active, finished, strict=True) if not f]
        seen = cache.length + 1
        hidden = model(
            idx_next[:, None],
            cache=cache,
            positions=next_position[:, None],
            attn_mask=key_is_real[:, None, None, :seen],
            return_hidden=True,
        )
        next_position += 1
    return new_tokens


# ---------------------------------------------------------------------------
# 7. Pretrained weights (notebook 04)
# ---------------------------------------------------------------------------

GPT2_FILES = [
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
]
GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"

# the second source: the same weights as safetensors files on Hugging Face
SAFETENSORS_BASE_URL = "https://huggingface.co/openai-community"
SAFETENSORS_REPOS = {
    "124M": "gpt2",
    "355M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
}
SAFETENSORS_FILES = ["config.json", "model.safetensors"]
# Hugging Face's names inside block N ("h.N.<name>") -> keys of params["blocks"][N];
# their Conv1D weights are stored [in, out], like OpenAI's
SAFETENSORS_BLOCK_NAMES = {
    "ln_1.weight": ("ln_1", "g"),
    "ln_1.bias": ("ln_1", "b"),
    "attn.c_attn.weight": ("attn", "c_attn", "w"),
    "attn.c_attn.bias": ("attn", "c_attn", "b"),
    "attn.c_proj.weight": ("attn", "c_proj", "w"),
    "attn.c_proj.bias": ("attn", "c_proj", "b"),
    "ln_2.weight": ("ln_2", "g"),
    "ln_2.bias": ("ln_2", "b"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "w"),
    "mlp.c_fc.bias": ("mlp", "c_fc", "b"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "w"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "b"),
}
SAFETENSORS_TOP_NAMES = {
    "wte.weight": "wte",
    "wpe.weight": "wpe",
    "ln_f.weight": "g",
    "ln_f.bias": "b",
}


def describe_network_error(exc: BaseException, url: str | None = None) -> str:
    """A short explanation of a failed download, with the usual fix.

    `url`, when given, lets it name the proxy setting the download went through.
    """
    import ssl

    reason = getattr(exc, "reason", exc)
    text = str(reason).rstrip(".")
    if isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"{text}. The server's TLS certificate could not be verified, so nothing was "
            "downloaded. On macOS, run 'Install Certificates.command' from your Python's "
            "folder in Applications. Behind a company proxy or antivirus that inspects "
            "HTTPS, set the environment variable SSL_CERT_FILE to its certificate bundle "
            "(a .pem file from your IT department) and restart Jupyter."
        )
    if isinstance(reason, ssl.SSLError):
        return (
            f"{text}. The secure (TLS) connection failed: a proxy, firewall or antivirus "
            "may be in the way. Try another network, or set HTTPS_PROXY to your proxy."
        )
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 407:
            return (
                "HTTP 407 Proxy Authentication Required: the proxy wants a user name and "
                "password. Put them into the proxy address: "
                "HTTPS_PROXY=http://user:password@proxy:8080."
            )
        return f"HTTP {exc.code} {exc.reason}"
    parts = urllib.parse.urlsplit(url or "https://")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not (parts.hostname and urllib.request.proxy_bypass(parts.hostname)):
        proxy = re.sub(r"//[^/@]*@", "//", proxy)  # never print a proxy password
        return (
            f"{text}. The download goes through the proxy {proxy} (environment variable "
            f"{parts.scheme.upper()}_PROXY): check that address and that the proxy runs, "
            "or unset the variable if you are not behind a proxy."
        )
    return (
        f"{text}. Check the internet connection; behind a proxy set HTTPS_PROXY "
        "(for example HTTPS_PROXY=http://proxy:8080) before starting Jupyter."
    )


def download_file(
    url: str,
    destination: str | Path,
    show_progress: bool = True,
    expected_sha256: str | None = None,
) -> Path:
    """Download `url` to `destination`, resuming a partial download.

    Bytes arrive in `destination.part`; the file gets its final name only when
    complete (and, with `expected_sha256`, when its checksum matches), so an existing
    `destination` is always whole and is skipped. A mismatch deletes the download
    and raises ValueError.
    """
    from tqdm import tqdm

    destination = Path(destination)
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        # 416 "range not satisfiable": the part file already holds all the bytes,
        # unless the server's size ("bytes */SIZE") says it belongs to another file
        size = re.fullmatch(r"bytes \*/(\d+)", (exc.headers or {}).get("Content-Range", ""))
        if size is not None and int(size[1]) != have:
            part.unlink()
            return download_file(url, destination, show_progress, expected_sha256)
        response = None
    if response is not None:
        with response:
            if have and response.status != 206:
                have = 0  # the server ignored the range: start again
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with (
                open(part, "ab" if have else "wb") as f,
                tqdm(
                    total=total,
                    initial=have,
                    unit="iB",
                    unit_scale=True,
                    desc=destination.name,
                    disable=not show_progress,
                ) as bar,
            ):
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise ConnectionError(
                f"Download of {url} stopped after {part.stat().st_size} of {total} bytes. "
                "Run the cell again: it continues where it stopped."
            )
    if expected_sha256 is not None:
        actual = sha256_of_file(part)
        if actual != expected_sha256.lower():
            part.unlink()
            raise ValueError(
                f"The file downloaded from {url} has SHA-256 {actual}, but {expected_sha256} "
                "was expected: it is not the file this course was written for (it changed "
                "on the server, or a proxy or login page answered instead). The download "
                "was deleted. Run the cell again; if this repeats, download the file in a "
                f"browser and save it as {destination}."
            )
    os.replace(part, destination)
    return destination


def download_and_load_gpt2(
    model_size: str,
    models_dir: str | Path,
    base_url: str = GPT2_BASE_URL,
    backup_base_url: str = GPT2_BACKUP_BASE_URL,
    source: str = "auto",
    safetensors_base_url: str = SAFETENSORS_BASE_URL,
) -> tuple[dict, dict]:
    """Download GPT-2 (if needed) and return `(settings, params)` in the book's layout.

    `model_size` is "124M", "355M", "774M", "1558M", or "offline" for the tiny
    random-weight model that `write_offline_gpt2` makes with no network.
    `source="auto"` reads OpenAI's TensorFlow checkpoint, and the safetensors file
    of Hugging Face's openai-community/gpt2* repositories when TensorFlow cannot be
    imported or OpenAI's host and its backup fail; "tensorflow" or "safetensors"
    forces one. It prints which source it used.
    """
    if model_size not in ("124M", "355M", "774M", "1558M", "offline"):
        raise ValueError(
            f'model_size {model_size!r}: use "124M", "355M", "774M", "1558M" or "offline".'
        )
    if source not in ("auto", "tensorflow", "safetensors"):
        raise ValueError(f'source {source!r}: use "auto", "tensorflow" or "safetensors".')
    model_dir = Path(models_dir) / model_size
    name = (
        "the offline model (random weights)" if model_size == "offline" else f"GPT-2 {model_size}"
    )
    why_not_tensorflow = None
    if source in ("auto", "tensorflow"):
        try:
            import tensorflow  # noqa: F401
        except Exception as exc:  # no wheel for this Python or platform, or a broken install
            why_not_tensorflow = f"TensorFlow cannot be imported ({type(exc).__name__}: {exc})."
            if source == "tensorflow":
                raise ImportError(
                    f"{why_not_tensorflow} Install it (pip install tensorflow), or use "
                    'source="safetensors", which needs no TensorFlow.'
                ) from exc
    if source != "safetensors" and why_not_tensorflow is None:
        try:
            if model_size == "offline":
                write_offline_gpt2(model_dir)
            else:
                download_gpt2_tf_files(model_size, model_dir, base_url, backup_base_url)
        except ConnectionError as exc:
            if source == "tensorflow":
                raise ConnectionError(
                    f"{exc}\nPut these files into {model_dir.resolve()} (for example copied "
                    "from a machine that has them) and run the cell again, use source="
                    '"safetensors", or choose the offline model.'
                ) from exc
            why_not_tensorflow = f"OpenAI's host and its backup failed. {exc}"
        else:
            settings = json.loads((model_dir / "hparams.json").read_text())
            params = load_gpt2_params_from_tf_ckpt(tf_checkpoint_path(model_dir), settings)
            print(f"Loaded {name} from OpenAI's TensorFlow checkpoint (source: tensorflow).")
            return settings, params
    if why_not_tensorflow is not None:
        print(f"{why_not_tensorflow}\nUsing the safetensors checkpoint instead.")
    if model_size == "offline":
        write_offline_gpt2(model_dir, fmt="safetensors")
    else:
        try:
            download_gpt2_safetensors(model_size, model_dir, safetensors_base_url)
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            url = f"{safetensors_base_url}/{SAFETENSORS_REPOS[model_size]}"
            raise ConnectionError(
                f"Could not download GPT-2 {model_size} from {url}: "
                f"{describe_network_error(exc, url)}\n"
                + (f"Before that: {why_not_tensorflow}\n" if why_not_tensorflow else "")
                + f"Put {' and '.join(SAFETENSORS_FILES)} into {model_dir.resolve()} (for "
                "example copied from a machine that has them) and run the cell again, or "
                "choose the offline model."
            ) from exc
    settings, params = load_gpt2_from_safetensors(model_dir)
    print(f"Loaded {name} from the safetensors checkpoint (source: safetensors).")
    return settings, params


def download_gpt2_tf_files(
    model_size: str,
    model_dir: str | Path,
    base_url: str = GPT2_BASE_URL,
    backup_base_url: str = GPT2_BACKUP_BASE_URL,
) -> Path:
    """Download the seven files of OpenAI's checkpoint, each from the backup if needed."""
    model_dir = Path(model_dir)
    failed, reasons = [], []
    for filename in GPT2_FILES:
        for base in (base_url, backup_base_url):
            url = f"{base}/{model_size}/{filename}"
            try:
                download_file(url, model_dir / filename)
                break
            except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
                reason = f"{base}: {describe_network_error(exc, url)}"
                if reason not in reasons:  # usually the same for every file
                    reasons.append(reason)
        else:
            failed.append(filename)
    if failed:
        raise ConnectionError(
            f"Could not download {len(failed)} of the GPT-2 {model_size} files from "
            "either source:\n"
            + "".join(f"  {name}\n" for name in failed)
            + "because:\n"
            + "\n".join(f"- {reason}" for reason in reasons)
        )
    return model_dir


def download_gpt2_safetensors(
    model_size: str, model_dir: str | Path, base_url: str = SAFETENSORS_BASE_URL
) -> Path:
    """Download config.json and model.safetensors of the Hugging Face GPT-2 repository."""
    model_dir = Path(model_dir)
    repo_url = f"{base_url}/{SAFETENSORS_REPOS[model_size]}/resolve/main"
    for filename in SAFETENSORS_FILES:
        download_file(f"{repo_url}/{filename}", model_dir / filename)
    return model_dir


def tf_checkpoint_path(model_dir: str | Path) -> str:
    """The checkpoint prefix (".../model.ckpt") that TensorFlow reads."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(model_dir))
    if path is None:
        raise FileNotFoundError(
            f"No TensorFlow checkpoint in {model_dir}: it needs the files "
            f"{', '.join(GPT2_FILES)}. Delete the folder and run the cell again."
        )
    return path


def load_gpt2_params_from_tf_ckpt(ckpt_path: str, settings: dict) -> dict:
    """Read OpenAI's TensorFlow variables into nested dicts of NumPy arrays.

    `model/h3/attn/c_attn/w` becomes `params["blocks"][3]["attn"]["c_attn"]["w"]`,
    `model/ln_f/g` becomes `params["g"]`: the same dicts as the book's loader.
    """
    import tensorflow as tf

    params: dict = {"blocks": [{} for _ in range(settings["n_layer"])]}
    try:
        variables = tf.train.list_variables(ckpt_path)
    except Exception as exc:  # TensorFlow raises several error types here
        raise RuntimeError(
            f"Could not read the TensorFlow checkpoint {ckpt_path}: {exc}\n"
            "The files are probably incomplete or corrupted: delete the folder and run "
            "the cell again to download them anew."
        ) from None
    for name, _ in variables:
        array = np.squeeze(tf.train.load_variable(ckpt_path, name))
        parts = name.split("/")[1:]  # drop the leading "model"
        target = params
        if parts[0].startswith("h"):
            target = params["blocks"][int(parts[0][1:])]
        # like the book: "h3" and "ln_f" are not keys ("model/ln_f/g" -> params["g"])
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = array
    return params


def load_gpt2_from_safetensors(model_dir: str | Path) -> tuple[dict, dict]:
    """Read Hugging Face's GPT-2 files into `(settings, params)` like the TF loader's.

    `config.json` gives the settings (the keys of OpenAI's hparams.json);
    `model.safetensors` the weights: `h.3.attn.c_attn.weight` becomes
    `params["blocks"][3]["attn"]["c_attn"]["w"]`, `ln_f.weight` becomes `params["g"]`.
    """
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    settings = {
        "n_vocab": config["vocab_size"],
        "n_ctx": config.get("n_ctx", config["n_positions"]),
        "n_embd": config["n_embd"],
        "n_head": config["n_head"],
        "n_layer": config["n_layer"],
    }
    try:
        tensors = load_file(str(model_dir / "model.safetensors"))
    except Exception as exc:  # the safetensors package has its own error type
        raise RuntimeError(
            f"Could not read {model_dir / 'model.safetensors'}: {exc}\n"
            "The file is probably incomplete or corrupted: delete it and run the cell "
            "again to download it anew."
        ) from None
    params: dict = {"blocks": [{} for _ in range(settings["n_layer"])]}
    found = set()
    for full_name, array in tensors.items():
        name = full_name.removeprefix("transformer.")
        block = re.fullmatch(r"h\.(\d+)\.(.+)", name)
        if name == "lm_head.weight" or (block and block[2] in ("attn.bias", "attn.masked_bias")):
            continue  # the output head (tied to wte) and the causal-mask buffers
        if name in SAFETENSORS_TOP_NAMES:
            params[SAFETENSORS_TOP_NAMES[name]] = array.astype(np.float32, copy=False)
        elif block and block[2] in SAFETENSORS_BLOCK_NAMES and int(block[1]) < settings["n_layer"]:
            *keys, last = SAFETENSORS_BLOCK_NAMES[block[2]]
            target = params["blocks"][int(block[1])]
            for key in keys:
                target = target.setdefault(key, {})
            target[last] = array.astype(np.float32, copy=False)
        else:
            raise ValueError(
                f"{model_dir / 'model.safetensors'} holds {full_name!r}, which is not a "
                f"tensor of a {settings['n_layer']}-layer GPT-2: download the file of the "
                "model size you chose (openai-community/gpt2, gpt2-medium, ...)."
            )
        found.add(name)
    expected = list(SAFETENSORS_TOP_NAMES) + [
        f"h.{i}.{n}" for i in range(settings["n_layer"]) for n in SAFETENSORS_BLOCK_NAMES
    ]
    missing = [n for n in expected if n not in found]
    if missing:
        raise ValueError(
            f"{model_dir / 'model.safetensors'} lacks {len(missing)} of the "
            f"{len(expected)} GPT-2 tensors (first: {missing[0]}): delete it and run the "
            "cell again to download it anew."
        )
    return settings, params


def assign(left: torch.Tensor, right, name: str = "tensor") -> nn.Parameter:
    """A parameter holding `right`, after checking it has `left`'s shape."""
    right = torch.as_tensor(np.asarray(right))
    if left.shape != right.shape:
        raise ValueError(
            f"Shape mismatch for {name}: the model has {tuple(left.shape)}, the "
            f"checkpoint has {tuple(right.shape)}. The model configuration does not "
            "match the checkpoint: choose the model size the weights were made for."
        )
    return nn.Parameter(right.clone().detach().to(left.dtype))


def load_weights_into_gpt(gpt: GPTModel, params: dict) -> None:
    """Copy OpenAI's GPT-2 weights into a GPTModel (the book's mapping)."""
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"], "pos_emb.weight")
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"], "tok_emb.weight")
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(
            f"The checkpoint has {len(params['blocks'])} transformer blocks, the model "
            f"{len(gpt.trf_blocks)}: choose the model size the weights were made for."
        )
    for b, (block, p) in enumerate(zip(gpt.trf_blocks, params["blocks"], strict=True)):
        pre = f"trf_blocks.{b}"
        q_w, k_w, v_w = np.split(p["attn"]["c_attn"]["w"], 3, axis=-1)
        q_b, k_b, v_b = np.split(p["attn"]["c_attn"]["b"], 3, axis=-1)
        att = block.att
        att.W_query.weight = assign(att.W_query.weight, q_w.T, f"{pre}.att.W_query.weight")
        att.W_key.weight = assign(att.W_key.weight, k_w.T, f"{pre}.att.W_key.weight")
        att.W_value.weight = assign(att.W_value.weight, v_w.T, f"{pre}.att.W_value.weight")
        att.W_query.bias = assign(att.W_query.bias, q_b, f"{pre}.att.W_query.bias")
        att.W_key.bias = assign(att.W_key.bias, k_b, f"{pre}.att.W_key.bias")
        att.W_value.bias = assign(att.W_value.bias, v_b, f"{pre}.att.W_value.bias")
        proj = p["attn"]["c_proj"]
        att.out_proj.weight = assign(att.out_proj.weight, proj["w"].T, f"{pre}.att.out_proj.weight")
        att.out_proj.bias = assign(att.out_proj.bias, proj["b"], f"{pre}.att.out_proj.bias")
        ff = block.ff.layers
        fc, fc_proj = p["mlp"]["c_fc"], p["mlp"]["c_proj"]
        ff[0].weight = assign(ff[0].weight, fc["w"].T, f"{pre}.ff.layers.0.weight")
        ff[0].bias = assign(ff[0].bias, fc["b"], f"{pre}.ff.layers.0.bias")
        ff[2].weight = assign(ff[2].weight, fc_proj["w"].T, f"{pre}.ff.layers.2.weight")
        ff[2].bias = assign(ff[2].bias, fc_proj["b"], f"{pre}.ff.layers.2.bias")
        block.norm1.scale = assign(block.norm1.scale, p["ln_1"]["g"], f"{pre}.norm1.scale")
        block.norm1.shift = assign(block.norm1.shift, p["ln_1"]["b"], f"{pre}.norm1.shift")
        block.norm2.scale = assign(block.norm2.scale, p["ln_2"]["g"], f"{pre}.norm2.scale")
        block.norm2.shift = assign(block.norm2.shift, p["ln_2"]["b"], f"{pre}.norm2.shift")
    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"], "final_norm.scale")
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"], "final_norm.shift")
    # GPT-2 ties the output head to the token embedding
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"], "out_head.weight")


def write_offline_gpt2(model_dir: str | Path, seed: int = 123, fmt: str = "tensorflow") -> Path:
    """Write a tiny GPT-2 checkpoint with random weights, as a real download would be.

    fmt="tensorflow": the same seven files as OpenAI's download, written with
    TensorFlow; fmt="safetensors": Hugging Face's config.json and model.safetensors.
    Both hold the very same weights, so loading either runs the code that loads a
    real GPT-2. Its answers are noise. Files that already exist are kept.
    """
    if fmt not in ("tensorflow", "safetensors"):
        raise ValueError(f'fmt {fmt!r}: use "tensorflow" or "safetensors".')
    model_dir = Path(model_dir)
    needed = GPT2_FILES if fmt == "tensorflow" else SAFETENSORS_FILES
    if all((model_dir / name).exists() for name in needed):
        return model_dir
    arrays, hparams = offline_gpt2_arrays(seed)
    if fmt == "tensorflow":
        write_tf_checkpoint(model_dir, arrays, hparams)
    else:
        write_safetensors_checkpoint(model_dir, arrays, hparams)
    return model_dir


def offline_gpt2_arrays(seed: int = 123) -> tuple[dict, dict]:
    """The offline model's random weights under OpenAI's TensorFlow names, and hparams."""
    cfg = model_config(OFFLINE_MODEL)
    d, n_layers, vocab, ctx = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"], 1024
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.02):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    arrays = {"model/wte": normal(vocab, d), "model/wpe": normal(ctx, d, std=0.01)}
    for i in range(n_layers):
        h = f"model/h{i}"
        arrays[f"{h}/ln_1/g"] = np.ones(d, np.float32)
        arrays[f"{h}/ln_1/b"] = np.zeros(d, np.float32)
        arrays[f"{h}/attn/c_attn/w"] = normal(1, d, 3 * d)
        arrays[f"{h}/attn/c_attn/b"] = np.zeros(3 * d, np.float32)
        arrays[f"{h}/attn/c_proj/w"] = normal(1, d, d)
        arrays[f"{h}/attn/c_proj/b"] = np.zeros(d, np.float32)
        arrays[f"{h}/ln_2/g"] = np.ones(d, np.float32)
        arrays[f"{h}/ln_2/b"] = np.zeros(d, np.float32)
        arrays[f"{h}/mlp/c_fc/w"] = normal(1, d, 4 * d)
        arrays[f"{h}/mlp/c_fc/b"] = np.zeros(4 * d, np.float32)
        arrays[f"{h}/mlp/c_proj/w"] = normal(1, 4 * d, d)
        arrays[f"{h}/mlp/c_proj/b"] = np.zeros(d, np.float32)
    arrays["model/ln_f/g"] = np.ones(d, np.float32)
    arrays["model/ln_f/b"] = np.zeros(d, np.float32)
    hparams = {
        "n_vocab": vocab,
        "n_ctx": ctx,
        "n_embd": d,
        "n_head": cfg["n_heads"],
        "n_layer": n_layers,
    }
    return arrays, hparams


def write_safetensors_checkpoint(model_dir: str | Path, arrays: dict, hparams: dict) -> None:
    """Save arrays named like OpenAI's ("model/h0/ln_1/g") in Hugging Face's form.

    Writes `model.safetensors` ("h.0.ln_1.weight", ...) and a `config.json`.
    """
    from safetensors.numpy import save

    model_dir = Path(model_dir)
    tensors = {
        "wte.weight": arrays["model/wte"],
        "wpe.weight": arrays["model/wpe"],
        "ln_f.weight": arrays["model/ln_f/g"],
        "ln_f.bias": arrays["model/ln_f/b"],
    }
    for i in range(hparams["n_layer"]):
        for hf_name, keys in SAFETENSORS_BLOCK_NAMES.items():
            # OpenAI's weights have a leading axis of 1 ([1, in, out]); Hugging Face's not
            tensors[f"h.{i}.{hf_name}"] = np.squeeze(arrays[f"model/h{i}/" + "/".join(keys)])
    write_atomic(model_dir / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": hparams["n_vocab"],
        "n_positions": hparams["n_ctx"],
        "n_ctx": hparams["n_ctx"],
        "n_embd": hparams["n_embd"],
        "n_head": hparams["n_head"],
        "n_layer": hparams["n_layer"],
    }
    write_json_atomic(model_dir / "config.json", config)


def write_tf_checkpoint(model_dir: str | Path, arrays: dict, hparams: dict) -> None:
    """Save named NumPy arrays as a TensorFlow v1 checkpoint plus OpenAI's side files."""
    import tensorflow as tf

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables = [
            tf.compat.v1.Variable(value, name=name, dtype=tf.float32)
            for name, value in arrays.items()
        ]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(model_dir / "model.ckpt"))
    # the checkpoint index records a relative path, like OpenAI's
    (model_dir / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    )
    write_json_atomic(model_dir / "hparams.json", hparams)
    for name in ("encoder.json", "vocab.bpe"):
        write_atomic(model_dir / name, (TOKENIZER_DIR / name).read_bytes())


# ---------------------------------------------------------------------------
# 8. Training (notebooks 05, 06)
# ---------------------------------------------------------------------------


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device
) -> torch.Tensor:
    """Mean cross-entropy over the batch's targets; -100 targets are ignored.

    With a fast GPTModel the same loss takes less work: the output layer (emb_dim x
    50,257, the largest matrix product) runs only at the positions whose target counts,
    not at padding or masked instructions, and the padding at the end of the rows is
    left out altogether (see `pack_batch`).
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    if not (isinstance(model, GPTModel) and model.fast):  # the book's computation
        logits = model(input_batch)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
    packed = pack_batch(input_batch, target_batch, model.tok_emb.embedding_dim)
    if packed is None:
        hidden = model(input_batch, return_hidden=True)
    else:
        input_batch, positions, attn_mask, target_batch = packed
        hidden = model(input_batch, positions=positions, attn_mask=attn_mask, return_hidden=True)
    counted = target_batch != -100
    logits = model.out_head(hidden[counted])
    return torch.nn.functional.cross_entropy(logits, target_batch[counted])


def pack_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, emb_dim: int):
    """The batch without its trailing padding, as one sequence of rows side by side.

    A row's positions after its last counted target influence no counted target
    (attention looks only backwards), so they can be dropped. The remaining tokens of
    all rows go into one (1, n) sequence, with each token's position within its row and
    an attention mask that lets a token see only the earlier tokens of its own row:
    the very same computation without the padding. Attention over one long sequence
    costs more than over short rows, so this returns None (keep the batch as it is)
    unless the matrix products saved outweigh it.
    Returns (input ids, positions, attention mask, targets) or None.
    """
    batch, tokens = input_batch.shape
    cols = torch.arange(tokens, device=input_batch.device)
    counted = target_batch != -100
    last = torch.where(counted, cols, -1).amax(dim=1)  # last counted position of each row
    needed = cols[None, :] <= last[:, None]
    n = int(needed.sum())
    # per block, a dropped token saves 12 x emb_dim^2 multiply-adds in the matrix
    # products; each extra attention score costs 2 x emb_dim (n x n scores instead of
    # batch x tokens^2 / 2 for causal rows): compare both, divided by 2 x emb_dim
    saved = 6 * emb_dim * (batch * tokens - n)
    added = n * n - batch * tokens * tokens // 2
    if n == 0 or n == batch * tokens or saved <= added:
        return None
    rows = torch.arange(batch, device=input_batch.device)[:, None].expand(batch, tokens)[needed]
    positions = cols.expand(batch, tokens)[needed]
    attn_mask = (rows[:, None] == rows[None, :]) & (positions[None, :] <= positions[:, None])
    packed_targets = target_batch[needed][None]
    return input_batch[needed][None], positions[None], attn_mask[None, None], packed_targets


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The book's AdamW, as PyTorch's fused kernel where this device and PyTorch have it.

    The same update rule as `torch.optim.AdamW(model.parameters(), lr=lr,
    weight_decay=weight_decay)`; the fused version updates all parameters in one pass
    instead of a dozen small operations per parameter (otherwise the multi-tensor one).
    """
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused AdamW for this device
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)


def calc_loss_loader(
    data_loader, model: nn.Module, device, num_batches: int | None = None
) -> float:
    """Average loss over the first `num_batches` batches (all when None)."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


# the book's validation loss before fine-tuning (GPT-2 medium, Alpaca prompts, seed 123)
BOOK_INITIAL_VAL_LOSS = {"gpt2-medium (355M)": 3.762}


def check_initial_loss(val_loss: float, model_name: str, tolerance: float = 0.5) -> bool:
    """Sanity-check the validation loss of pretrained GPT-2 before fine-tuning.

    Prints what it finds and returns False when the loss is far from what the book
    measured (about 3.8 for GPT-2 medium): a sign that the device computes wrong
    numbers (MPS on PyTorch < 2.9 gave 19.9) or that the weights were not loaded.
    """
    name = resolve_model_name(model_name)
    if name == OFFLINE_MODEL:
        print(
            f"Validation loss {val_loss:.3f}. The offline model has random weights, so "
            "its loss (near ln(50257) = 10.8) says nothing about the device: the check "
            "means something only with pretrained GPT-2."
        )
        return True
    expected = BOOK_INITIAL_VAL_LOSS.get(name)
    if expected is not None:
        reference = f"the book measured {expected:.3f} for {name}"
        far = not abs(val_loss - expected) <= tolerance  # also true for nan
    else:  # the book gives no figure: any pretrained GPT-2 is far below random guessing
        reference = "pretrained GPT-2 stays well below 6 (random guessing gives 10.8)"
        far = not val_loss < 6.0
    if far:
        print(
            f"WARNING: validation loss {val_loss:.3f} before fine-tuning, but {reference}. "
            "Something computes wrong numbers: run again with COURSE_DEVICE=cpu and "
            "compare (MPS on PyTorch older than 2.9 gives such losses), and check that "
            "load_weights_into_gpt ran on this model."
        )
        return False
    print(f"Validation loss {val_loss:.3f} before fine-tuning: as expected ({reference}).")
    return True


def evaluate_model(model, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """Train and validation loss on `eval_iter` batches each, without gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context: str) -> str:
    """Greedily continue `start_context` by 50 tokens and print it on one line."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    sample = generate_fast if isinstance(model, GPTModel) else generate  # same tokens
    token_ids = sample(model, encoded, max_new_tokens=50, context_size=context_size)
    text = token_ids_to_text(token_ids, tokenizer)
    print(text.replace("\n", " "))
    model.train()
    return text


def train_model_simple(
    model,
    train_loader,
    val_loader,
    optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
) -> tuple[list[float], list[float], list[int]]:
    """The book's training loop: returns train losses, val losses, tokens seen."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(
                    f"Ep {epoch + 1} (Step {global_step:06d}): "
                    f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                )
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


# -- Mixed precision ---------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def choose_precision(device: str | torch.device, requested: str = "auto") -> str:
    """The number format for training, "fp32", "bf16" or "fp16", printed with the reason.

    "auto" (COURSE_PRECISION) picks bf16 mixed precision on CUDA GPUs that support it
    (A100, L4, RTX 30xx and newer) and fp32 everywhere else. "bf16" may be asked for on
    the CPU too (fast on CPUs with bfloat16 instructions); "fp16" needs a CUDA GPU and
    uses a gradient scaler. In mixed precision the weights stay fp32: only the matrix
    products run in 16 bits.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: use one of {', '.join(PRECISIONS)}.")
    device = torch.device(device)
    if requested == "fp16" and device.type != "cuda":
        raise ValueError(
            f"fp16 training needs a CUDA GPU (it uses a gradient scaler); on {device.type} "
            'use "bf16" or "fp32".'
        )
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        has_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        if requested == "fp32":
            choice, why = "fp32", "as asked"
        elif requested == "fp16":
            choice, why = "fp16", f"as asked: float16 on {gpu}, with a gradient scaler"
        elif has_bf16:
            how = "the default" if requested == "auto" else "as asked"
            choice, why = "bf16", f"{how}: {gpu} supports bfloat16; the weights stay fp32"
        else:
            choice = "fp32"
            why = (
                f"{gpu} has no bfloat16 support (a T4 or older GPU); COURSE_PRECISION=fp16 "
                "trains in float16 with a gradient scaler instead"
            )
    elif requested == "bf16":
        choice, why = "bf16", f"as asked: bfloat16 autocast on the {device.type}"
    else:
        how = "as asked" if requested == "fp32" else f"the default on the {device.type}"
        choice, why = "fp32", f"{how}; COURSE_PRECISION=bf16 tries bfloat16 autocast"
    print(f"Precision: {choice} ({why}).")
    return choice


def autocast_context(device: str | torch.device, precision: str):
    """A `with` context that runs the forward pass in bf16 or fp16; does nothing for fp32."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f'precision {precision!r}: use "fp32", "bf16" or "fp16".')
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=precision != "fp32")


# -- Saving and loading weights ----------------------------------------------


def read_pth(path: str | Path, notebook: str = "05_instruction_finetuning") -> Any:
    """`torch.load` a .pth file onto the CPU; a missing or damaged file names the fix."""
    path = require_artifact(path, notebook)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several error types for damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RuntimeError(
            f"{path} could not be read ({type(exc).__name__}: {reason}). The file is "
            "damaged or incomplete (an interrupted copy?) or is not a PyTorch file. "
            f"Delete it and run notebook {notebook} again to write it anew."
        ) from None


def load_state_dict_checked(model: nn.Module, state_dict: Any, source: str) -> None:
    """`model.load_state_dict`, but a mismatch lists the tensors that do not fit.

    The causal-mask buffers (`...att.mask`) are constants, so files with or without
    them load alike; prefixes added by `torch.compile` or DataParallel are removed.
    """
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(
            f"{source} holds no model weights (a dict of tensors, as written by "
            "torch.save(model.state_dict(), path)). Delete it and run notebook "
            "05_instruction_finetuning again."
        )
    state_dict = {
        key.removeprefix("_orig_mod.").removeprefix("module."): value
        for key, value in state_dict.items()
    }
    own = model.state_dict()

    def optional(key):
        return key.endswith(".att.mask")

    problems = [
        f"{key}: the file has {tuple(value.shape)}, the model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and not optional(key) and value.shape != own[key].shape
    ]
    problems += [
        f"{key}: missing in the file" for key in own if key not in state_dict and not optional(key)
    ]
    problems += [
        f"{key}: in the file, not in the model"
        for key in state_dict
        if key not in own and not optional(key)
    ]
    if problems:
        listed = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"The weights in {source} do not fit this model ({len(problems)} tensors):\n"
            f"  {listed}{more}\n"
            "They were saved for another model configuration: set COURSE_MODEL to the size "
            "they were trained with, or run notebook 05_instruction_finetuning again for "
            "this model."
        )
    model.load_state_dict(
        {key: value for key, value in state_dict.items() if not optional(key)}, strict=False
    )


def load_model_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a .pth file of weights into `model` (notebook 05's `<model>-sft.pth`).

    Reads the book's `torch.save(model.state_dict(), path)` files and this course's
    training checkpoints. A missing, damaged or mismatched file stops with a message
    that names the file, the tensors that do not fit and what to do.
    """
    state = read_pth(path)
    if isinstance(state, dict) and "model_state_dict" in state:  # a training checkpoint
        state = state["model_state_dict"]
    load_state_dict_checked(model, state, str(path))
    return model


# -- Resumable training ------------------------------------------------------

CHECKPOINT_FORMAT = "course-training-checkpoint-1"


def get_rng_states(data_loader=None) -> dict:
    """The state of every random number generator training draws from.

    PyTorch's (the shuffled order of each epoch, dropout), the GPU's, NumPy's and
    Python's, and the data loader's own generator if it has one.
    """
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            *numpy_state[2:],
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    if data_loader is not None and getattr(data_loader, "generator", None) is not None:
        states["loader"] = data_loader.generator.get_state()
    return states


def set_rng_states(states: dict, data_loader=None) -> None:
    """Put the random number generators back into the states `get_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])
    if "loader" in states and getattr(data_loader, "generator", None) is not None:
        data_loader.generator.set_state(states["loader"])


def save_training_checkpoint(
    path: str | Path, model, optimizer, scaler, settings: dict, progress: dict, rng: dict, epoch_rng
) -> None:
    """Write everything `train_model` needs to continue, atomically.

    `epoch_rng` is the generators' state just before the current epoch's shuffle (None
    between epochs); `rng` their state now. A finished run keeps only the weights and
    the history: it is never continued, and the optimizer's state is twice the model.
    """
    finished = progress["finished"]
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "settings": settings,
        "progress": progress,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": None if finished else optimizer.state_dict(),
        "scaler_state_dict": None if finished or scaler is None else scaler.state_dict(),
        "rng": None if finished else rng,
        "epoch_rng": None if finished else epoch_rng,
    }
    torch_save_atomic(checkpoint, path)


def load_training_checkpoint(
    path: str | Path, model, optimizer, scaler, settings: dict
) -> dict | None:
    """Read a checkpoint of `train_model` into `model`, `optimizer` and `scaler`.

    Returns the checkpoint, or None when it holds a finished run with other settings
    (a new run may replace it). Stops with a clear message when the file is damaged,
    is not such a checkpoint, or holds an unfinished run with other settings
    (continuing it would mix two runs).
    """
    path = Path(path)
    start_over = (
        "Delete it (the training cell then starts from the beginning) or set "
        "COURSE_RETRAIN=1 (force=True) to overwrite it"
    )
    checkpoint = read_pth(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this course. {start_over}.")
    saved = checkpoint["settings"]
    changed = [
        f"{key} {saved.get(key)!r} then, {settings.get(key)!r} now"
        for key in sorted(set(saved) | set(settings))
        if saved.get(key) != settings.get(key)
    ]
    if changed and checkpoint["progress"]["finished"]:
        print(f"{path.name} holds a finished run with other settings ({'; '.join(changed)}).")
        return None
    if changed:
        raise ValueError(
            f"{path} holds an unfinished run with other settings ({'; '.join(changed)}), "
            f"and continuing it would mix two runs. {start_over}, or change the settings back."
        )
    load_state_dict_checked(model, checkpoint["model_state_dict"], str(path))
    if not checkpoint["progress"]["finished"]:
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"The optimizer state in {path} does not fit this optimizer ({exc}). {start_over}."
            ) from None
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler_state_dict"])
    return checkpoint


def train_model(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
    checkpoint_path: str | Path | None = None,
    precision: str = "fp32",
    run_config: dict | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = 5.0,
    force: bool = False,
    max_steps: int | None = None,
    show_progress: bool = True,
) -> dict:
    """`train_model_simple` that survives interruptions, with a progress bar.

    The same steps, evaluations and printed lines as the book's loop (with fp32, the
    same losses). In addition:

    - `checkpoint_path`: everything needed to continue (weights, optimizer, random
      number generators, position in the epoch, losses so far) is saved there after
      every epoch, every `checkpoint_minutes` and every `checkpoint_every` steps. If the
      file exists, training continues from it and ends with the same losses as an
      uninterrupted run. A finished run is not repeated (its weights and losses are
      loaded) unless `force=True`.
    - `run_config`: what else defines the run (model, prompt style, seed, ...); a
      checkpoint saved with other values is not continued.
    - `precision`: "fp32", or "bf16" / "fp16" mixed precision (see choose_precision).
    - `max_steps`: stop after this many steps in this call, with a checkpoint, as if
      interrupted.

    Returns the history: `train_losses`, `val_losses` and `tokens_seen` (the book's
    three lists), `eval_steps`, `samples` (the text generated after each epoch),
    `global_step`, `train_seconds` and `finished`.
    """
    from tqdm import tqdm

    device = torch.device(device)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(
            "train_loader has no batches: the training set is smaller than one batch "
            "(drop_last=True). Use more entries or a smaller batch size."
        )
    if eval_freq < 1 or eval_iter < 1:
        raise ValueError(
            f"eval_freq and eval_iter must be at least 1, got {eval_freq}, {eval_iter}."
        )
    settings = {
        "num_epochs": num_epochs,
        "steps_per_epoch": steps_per_epoch,
        "eval_freq": eval_freq,
        "eval_iter": eval_iter,
        "precision": precision,
        "lr": optimizer.param_groups[0]["lr"],
        "weight_decay": optimizer.param_groups[0].get("weight_decay"),
        **(run_config or {}),
    }
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    progress = {
        "epoch": 0,  # the epoch in progress (0-based)
        "batches_done": 0,  # batches of that epoch already trained on
        "global_step": -1,
        "tokens_seen": 0,
        "train_losses": [],
        "val_losses": [],
        "track_tokens_seen": [],
        "eval_steps": [],
        "samples": [],
        "train_seconds": 0.0,
        "finished": False,
    }
    resume = None
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        if checkpoint_path.exists() and not force:
            resume = load_training_checkpoint(checkpoint_path, model, optimizer, scaler, settings)
        if checkpoint_path.exists() and resume is None:
            print(f"Training from the start ({checkpoint_path.name} will be replaced).")
    if resume is not None:
        progress = resume["progress"]
        if progress["finished"]:
            print(
                f"This run already finished ({checkpoint_path.name}): its trained weights "
                f"are loaded. Final losses: train {progress['train_losses'][-1]:.3f}, val "
                f"{progress['val_losses'][-1]:.3f}. Set COURSE_RETRAIN=1 (force=True) to "
                "train again."
            )
            return training_history(progress)
        print(
            f"Continuing from {checkpoint_path.name}: epoch {progress['epoch'] + 1}, "
            f"{progress['global_step'] + 1} of {num_epochs * steps_per_epoch} steps done."
        )

    start_time = time.perf_counter()
    seconds_before = progress["train_seconds"]
    last_save = start_time
    steps_this_call = 0
    bar = tqdm(
        total=num_epochs * steps_per_epoch,
        initial=progress["global_step"] + 1,
        desc="Fine-tuning",
        unit="step",
        disable=not show_progress,
    )

    def save(epoch_rng):
        progress["train_seconds"] = seconds_before + time.perf_counter() - start_time
        save_training_checkpoint(
            checkpoint_path,
            model,
            optimizer,
            scaler,
            settings,
            progress,
            get_rng_states(train_loader),
            epoch_rng,
        )

    try:
        for epoch in range(progress["epoch"], num_epochs):
            model.train()
            if resume is not None:  # replay the shuffle of the epoch that was interrupted
                set_rng_states(resume["epoch_rng"] or resume["rng"], train_loader)
            epoch_rng = get_rng_states(train_loader)  # what this epoch's order comes from
            batches = iter(train_loader)
            if resume is not None:
                for _ in range(progress["batches_done"]):  # already trained on
                    next(batches)
                set_rng_states(resume["rng"], train_loader)
                resume = None
            for input_batch, target_batch in batches:
                optimizer.zero_grad()
                with autocast_context(device, precision):
                    loss = calc_loss_batch(input_batch, target_batch, model, device)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                progress["tokens_seen"] += input_batch.numel()
                progress["global_step"] += 1
                progress["batches_done"] += 1
                step = progress["global_step"]
                steps_this_call += 1
                bar.update(1)
                if step % eval_freq == 0:
                    with autocast_context(device, precision):
                        train_loss, val_loss = evaluate_model(
                            model, train_loader, val_loader, device, eval_iter
                        )
                    progress["train_losses"].append(train_loss)
                    progress["val_losses"].append(val_loss)
                    progress["track_tokens_seen"].append(progress["tokens_seen"])
                    progress["eval_steps"].append(step)
                    bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                    tqdm.write(
                        f"Ep {epoch + 1} (Step {step:06d}): "
                        f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                    )
                stop = max_steps is not None and steps_this_call >= max_steps
                due = (checkpoint_every is not None and (step + 1) % checkpoint_every == 0) or (
                    checkpoint_minutes is not None
                    and time.perf_counter() - last_save >= 60 * checkpoint_minutes
                )
                # (after an epoch's last batch the end-of-epoch checkpoint follows)
                if checkpoint_path is not None and (
                    stop or (due and progress["batches_done"] < steps_per_epoch)
                ):
                    save(epoch_rng)
                    last_save = time.perf_counter()
                if stop:
                    bar.close()
                    print(
                        f"Stopped after {steps_this_call} steps (max_steps), at step "
                        f"{step + 1} of {num_epochs * steps_per_epoch}."
                        + (" Run again to continue." if checkpoint_path is not None else "")
                    )
                    progress["train_seconds"] = seconds_before + time.perf_counter() - start_time
                    return training_history(progress)
            bar.refresh()
            progress["samples"].append(
                generate_and_print_sample(model, tokenizer, device, start_context)
            )
            progress["epoch"], progress["batches_done"] = epoch + 1, 0
            if checkpoint_path is not None and epoch + 1 < num_epochs:
                save(None)
                last_save = time.perf_counter()
        progress["finished"] = True
        progress["train_seconds"] = seconds_before + time.perf_counter() - start_time
        if checkpoint_path is not None:
            save(None)
    except KeyboardInterrupt:
        bar.close()
        if checkpoint_path is not None and checkpoint_path.exists():
            print(
                f"Interrupted. The last checkpoint is in {checkpoint_path.name}: run the "
                "cell again to continue from there."
            )
        elif checkpoint_path is not None:
            print("Interrupted before the first checkpoint: training starts anew next time.")
        raise
    finally:
        bar.close()
    return training_history(progress)


def training_history(progress: dict) -> dict:
    """What `train_model` returns: the losses so far and where training stands."""
    return {
        "train_losses": list(progress["train_losses"]),
        "val_losses": list(progress["val_losses"]),
        "tokens_seen": list(progress["track_tokens_seen"]),
        "eval_steps": list(progress["eval_steps"]),
        "samples": list(progress["samples"]),
        "global_step": progress["global_step"],
        "train_seconds": progress["train_seconds"],
        "finished": progress["finished"],
    }


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path: str | Path | None = None):
    """Loss against epochs, with tokens seen on a second x-axis (book figure 7.17)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: aligns the second axis
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------
# 9. Scoring with an LLM judge (notebook 09)
# ---------------------------------------------------------------------------

OLLAMA_DEFAULT_HOST = "http://localhost:11434"
JUDGE_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the book's
# The course's tests let a stand-in server (tests/ollama_standin.py) play Ollama: it
# scores by word overlap, and its model reports this digest, which no real model has.
STANDIN_JUDGE_DIGEST = hashlib.sha256(b"course stand-in judge").hexdigest()
# the book's three Llama 3 runs on the same responses: 50.32, 49.45 and 51.75
BOOK_JUDGE_SPREAD = 51.75 - 49.45


class JudgeError(RuntimeError):
    """The LLM judge (an Ollama server) could not answer; the message says what to do."""


def check_if_running(process_name: str) -> bool:
    """True when a local process whose name contains `process_name` runs (the book's check).

    It cannot see a server in Docker or on another machine: `ollama_status` asks the
    server itself over HTTP.
    """
    import psutil

    for proc in psutil.process_iter(["name"]):
        if process_name in (proc.info.get("name") or ""):  # None when access is denied
            return True
    return False


def ollama_host(host: str | None = None) -> str:
    """The judge's base URL: `host`, else OLLAMA_HOST, else http://localhost:11434.

    Reads OLLAMA_HOST the way Ollama does: "localhost", "0.0.0.0:11435" and
    "http://gpu-box:11434" all work; without a scheme the port defaults to 11434.
    """
    text = (host or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT_HOST).strip().rstrip("/")
    default_port = 11434
    if "://" not in text:
        text = "http://" + text
    elif text.startswith("https://"):
        default_port = 443
    elif text.startswith("http://"):
        default_port = 80
    parts = urllib.parse.urlsplit(text)
    hostname = parts.hostname or "localhost"
    if hostname in ("0.0.0.0", "::"):  # "listen everywhere" for the server: connect locally
        hostname = "localhost"
    if ":" in hostname:
        hostname = f"[{hostname}]"  # IPv6 address
    return f"{parts.scheme}://{hostname}:{parts.port or default_port}{parts.path}"


def ollama_urlopen(request: str | urllib.request.Request, timeout: float):
    """urlopen, but straight to a server on this machine even when a proxy is set."""
    url = request if isinstance(request, str) else request.full_url
    if urllib.parse.urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return opener.open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)


def ollama_get(host: str, path: str, timeout: float = 10) -> Any:
    """GET `host + path` from an Ollama server and decode the JSON answer."""
    with ollama_urlopen(host + path, timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def find_ollama_model(tags: dict, model: str) -> dict | None:
    """The entry of Ollama's /api/tags list for `model` ("llama3" means "llama3:latest")."""
    wanted = {model} if ":" in model else {model, model + ":latest"}
    for entry in tags.get("models", []):
        if entry.get("name") in wanted or entry.get("model") in wanted:
            return entry
    return None


def ollama_status(model: str = "llama3", host: str | None = None, timeout: float = 10) -> dict:
    """Ask the Ollama server over HTTP for its version and whether `model` is pulled.

    Returns the judge's description that the scores file records (model, tag,
    digest, Ollama version, options). Raises JudgeError saying exactly what to run
    when no server answers or the model is missing.
    """
    host = ollama_host(host)
    try:
        version = ollama_get(host, "/api/version", timeout)["version"]
        tags = ollama_get(host, "/api/tags", timeout)
    except urllib.error.HTTPError as exc:
        raise JudgeError(
            f"Something answers at {host}, but not like an Ollama server (HTTP {exc.code} "
            "for /api/version). Check OLLAMA_HOST: it must point at Ollama's port "
            "(11434 unless you changed it)."
        ) from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JudgeError(
            f"No Ollama server answers at {host} ({reason}).\n"
            "- Start it: run `ollama serve` in a terminal (or open the Ollama app), then "
            "run this cell again. Not installed? See https://ollama.com/download.\n"
            "- Running on another port, another machine or in Docker? Point the course at "
            "it with OLLAMA_HOST, e.g. `OLLAMA_HOST=http://localhost:11435 jupyter lab`, or "
            'os.environ["OLLAMA_HOST"] = "http://192.168.1.20:11434" in a cell above. '
            "In Docker publish the port: `docker run -d -p 11434:11434 ollama/ollama`."
        ) from None
    found = find_ollama_model(tags, model)
    if found is None:
        have = ", ".join(str(m.get("name")) for m in tags.get("models", [])) or "none"
        raise JudgeError(
            f"The Ollama server at {host} (version {version}) runs, but the judge model "
            f"{model!r} is not pulled (it has: {have}).\n"
            f"Pull it: run `ollama pull {model}` in a terminal (llama3 is about 4.7 GB; in "
            f"Docker: `docker exec -it ollama ollama pull {model}`), then run this cell again."
        )
    return {
        "model": model,
        "tag": found.get("name"),
        "digest": found.get("digest"),
        "options": dict(JUDGE_OPTIONS),
        "ollama_version": version,
        "details": found.get("details", {}),
    }


def is_standin_judge(judge: dict) -> bool:
    """True when `judge` (from `ollama_status`) is the tests' stand-in, not a language model.

    Decided by the model's digest, not by the version: Ollama built from source also
    reports version 0.0.0.
    """
    return judge.get("digest") == STANDIN_JUDGE_DIGEST


def default_judge_runs(judge: dict) -> int:
    """How often to score each response set: 3 with a real judge, 1 with the stand-in.

    A real judge's average moves a little from one scoring to the next, and three runs
    show by how much; the stand-in answers the same every time, so one run says it all.
    """
    return 1 if is_standin_judge(judge) else 3


def judge_options(run: int = 0, options: dict | None = None) -> dict:
    """The judge's options for scoring run `run`: the book's (or `options`) with seed + run.

    Run 0 sends exactly the book's request (seed 123). At temperature 0 the judge always
    takes the most likely token and the seed changes nothing; with a temperature above 0
    the seeds make the runs independent samples instead of copies of one another.
    """
    chosen = dict(JUDGE_OPTIONS if options is None else options)
    if "seed" in chosen:
        chosen["seed"] = chosen["seed"] + run
    return chosen


def read_chat_stream(request: urllib.request.Request, timeout: float) -> str:
    """Send a streaming /api/chat request and join the content of its NDJSON chunks."""
    reply = ""
    with ollama_urlopen(request, timeout) as response:
        for raw_line in response:
            line = raw_line.decode("utf-8").strip()
            if not line:
                continue
            try:
                chunk = json.loads(line)
            except json.JSONDecodeError:
                raise JudgeError(
                    f"The judge sent a line that is not JSON: {line[:200]!r}"
                ) from None
            if "error" in chunk:  # Ollama reports failures inside a 200 stream like this
                raise JudgeError(
                    f"The Ollama server failed while answering: {chunk['error']}\n"
                    "Look at the server's log (the terminal running `ollama serve`); a model "
                    "that does not fit in memory fails like this: try a smaller judge model."
                )
            reply += chunk.get("message", {}).get("content", "")
            if chunk.get("done"):
                return reply
    raise ConnectionError("the answer stream ended before its final chunk")


def query_model(
    prompt: str,
    model: str = "llama3",
    url: str | None = None,
    options: dict | None = None,
    timeout: float = 300,
    retries: int = 3,
    backoff: float = 1.0,
) -> str:
    """Send `prompt` to Ollama's chat API and return the reply (the book's function).

    As the book: streaming /api/chat at `url` (default: OLLAMA_HOST + "/api/chat")
    with seed 123, temperature 0 and a 2,048-token context. More robust: at most
    `timeout` seconds of silence, up to `retries` more attempts (after waiting
    `backoff`, 2 x `backoff`, ... seconds) when the connection fails or the server
    answers 5xx, and a JudgeError that says what went wrong otherwise.
    """
    url = url or f"{ollama_host()}/api/chat"
    data = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": dict(JUDGE_OPTIONS if options is None else options),
    }
    payload = json.dumps(data).encode("utf-8")
    problem = "no attempt made"
    for attempt in range(retries + 1):
        if attempt > 0:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(
            url, data=payload, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            return read_chat_stream(request, timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read().decode("utf-8"))["error"]
            except (ValueError, KeyError, TypeError, OSError):
                message = exc.reason
            if exc.code == 404 and "not found" in str(message) and "model" in str(message):
                raise JudgeError(
                    f"The Ollama server at {url} says: {message}. Pull the judge model: run "
                    f"`ollama pull {model}` in a terminal, then run this cell again."
                ) from None
            if exc.code < 500:
                raise JudgeError(
                    f"The Ollama server at {url} refused the request: HTTP {exc.code}: {message}"
                ) from None
            problem = f"HTTP {exc.code}: {message}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    hint = (
        "Is the server running? Check with helpers.ollama_status()."
        if "timed out" not in problem
        else f"It was silent for more than {timeout} s: on a CPU-only machine a large judge "
        "is slow, so pass a larger timeout, e.g. query_model(..., timeout=900)."
    )
    raise JudgeError(
        f"No answer from the Ollama server at {url} after {retries + 1} attempts "
        f"(last: {problem}). {hint}"
    )


def judge_prompt(entry: dict, json_key: str) -> str:
    """The book's scoring prompt for one entry and the response stored under `json_key`."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        " on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def parse_score(reply: str) -> int | None:
    """The integer score in a judge's reply, or None when there is no valid one.

    Reads "85", "Score: 85", "85/100", "85 out of 100" or "**85**"; the first number
    counts (after dropping mentions of the scale itself, such as "0 to 100"). Numbers
    outside 0-100 and fractions such as "85.5" are rejected.
    """
    text = re.sub(r"\b0\s*(?:to|-|–)\s*100\b", " ", reply)  # "from 0 to 100"
    text = re.sub(r"(?:/|\bout of)\s*100\b", " ", text)  # "85/100", "85 out of 100"
    match = re.search(r"(?<![\w.])-?\d+(?:[.,]\d+)?(?![\w.]\d)", text)
    if match is None or not re.fullmatch(r"\d+", match.group()):
        return None
    score = int(match.group())
    return score if 0 <= score <= 100 else None


def load_scores(scores_path: str | Path, run: int = 0) -> list[int | None]:
    """Per-entry scores of one run in a scores file (None where the reply was unreadable)."""
    record = json.loads(Path(scores_path).read_text(encoding="utf-8"))
    for saved_run in record["runs"]:
        if saved_run["run"] == run:
            return [entry["score"] for entry in saved_run["entries"]]
    runs = [saved_run["run"] for saved_run in record["runs"]]
    raise KeyError(f"{scores_path} has no run {run}; it has runs {runs}")


def score_summary(scores: list[int | None]) -> dict:
    """Average, counts and a histogram (0-9, 10-19, ..., 90-100) of judge scores."""
    readable = [s for s in scores if s is not None]
    histogram = [0] * 10
    for score in readable:
        histogram[min(score // 10, 9)] += 1
    return {
        "entries": len(scores),
        "scored": len(readable),
        "unreadable": len(scores) - len(readable),
        "average": sum(readable) / len(readable) if readable else float("nan"),
        "histogram": histogram,
    }


def generate_model_scores(
    json_data: list[dict],
    json_key: str,
    model: str = "llama3",
    scores_path: str | Path | None = None,
    run: int = 0,
    url: str | None = None,
    save_every: int = 1,
    **query_kwargs,
) -> list[int]:
    """Ask the judge to score the response under `json_key` of every entry (the book's).

    Returns the scores it could read, like the book. With `scores_path`, every entry's
    prompt, raw reply and score are kept in that JSON file (written after every
    `save_every` entries) with the judge's model, digest, Ollama version and options,
    and an interrupted scoring resumes: entries already answered for the same prompt
    are not asked again. `run` numbers repeated scorings of the same responses; run r
    asks with seed 123 + r (see `judge_options`) and the file keeps the options and
    Ollama version of each run.
    """
    from tqdm import tqdm

    missing = [i for i, entry in enumerate(json_data) if json_key not in entry]
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(json_data)} entries (the first: entry {missing[0]}) have "
            f"no {json_key!r} to score. Responses come from notebook 07_extracting_responses: "
            'run it first, and pass the key its file uses ("model_response").'
        )
    url = url or f"{ollama_host()}/api/chat"
    options = query_kwargs.get("options")
    base_options = dict(JUDGE_OPTIONS if options is None else options)
    run_options = judge_options(run, base_options)
    query_kwargs["options"] = run_options
    record, saved = None, {}
    if scores_path is not None:
        scores_path = Path(scores_path)
        status = ollama_status(model, url.split("/api/")[0])
        judge = {key: status[key] for key in ("model", "tag", "digest", "details")}
        judge["options"] = base_options
        if scores_path.exists():
            record = json.loads(scores_path.read_text(encoding="utf-8"))
            if record.get("judge") != judge or record.get("json_key") != json_key:
                backup = scores_path.with_name(scores_path.stem + ".previous.json")
                old_judge = record.get("judge") or {}
                print(
                    f"{scores_path.name} holds scores of another judge or response key "
                    f"({old_judge.get('tag')} {str(old_judge.get('digest'))[:12]}, "
                    f"options {old_judge.get('options')}, key {record.get('json_key')!r}): "
                    f"starting anew (the old file is kept as {backup.name})."
                )
                os.replace(scores_path, backup)
                record = None
        if record is None:
            record = {"judge": judge, "json_key": json_key, "runs": []}
        runs = [r for r in record["runs"] if r["run"] == run]
        asked_as = {"ollama_version": status["ollama_version"], "options": run_options}
        if runs and any(runs[0].get(key) != value for key, value in asked_as.items()):
            print(
                f"Run {run} in {scores_path.name} was scored with other options or another "
                f"Ollama version ({runs[0].get('options')}, {runs[0].get('ollama_version')}): "
                "scoring it anew."
            )
            record["runs"].remove(runs[0])
            runs = []
        if not runs:
            runs = [{"run": run, **asked_as, "entries": []}]
            record["runs"].append(runs[0])
            record["runs"].sort(key=lambda r: r["run"])
        this_run = runs[0]
        saved = {e["index"]: e for e in this_run["entries"]}

    entries, scores, asked, reused = [], [], 0, 0
    for index, entry in enumerate(tqdm(json_data, desc="Scoring entries")):
        prompt = judge_prompt(entry, json_key)
        old = saved.get(index)
        if old is not None and old["prompt"] == prompt:
            result = old
            reused += 1
        else:
            reply = query_model(prompt, model, url, **query_kwargs)
            result = {"index": index, "prompt": prompt, "reply": reply, "score": parse_score(reply)}
            asked += 1
            if result["score"] is None:
                tqdm.write(f"Could not convert score: {reply!r}")
        entries.append(result)
        if result["score"] is not None:
            scores.append(result["score"])
        if record is not None and result is not old and asked % save_every == 0:
            this_run["entries"] = entries + [e for i, e in saved.items() if i > index]
            write_json_atomic(scores_path, record)
    if record is not None:
        this_run["entries"] = entries
        this_run["summary"] = score_summary([e["score"] for e in entries])
        averages = [r["summary"]["average"] for r in record["runs"] if "summary" in r]
        record["summary"] = {
            "runs": len(averages),
            "run_averages": averages,
            "average": float(np.mean(averages)),
            "std": float(np.std(averages, ddof=1)) if len(averages) > 1 else None,
        }
        write_json_atomic(scores_path, record)
        if reused:
            print(f"{reused} of {len(json_data)} entries were already scored in {scores_path.name}")
    return scores


# -- Repeated runs and paired comparisons --------------------------------------------


def read_scores(scores: str | Path | dict) -> dict:
    """A scores record as `generate_model_scores` writes it: read from its path, or as given."""
    if isinstance(scores, dict):
        record, source = scores, "This scores record"
    else:
        path = require_artifact(scores, "09_scoring_the_responses")
        record, source = json.loads(path.read_text(encoding="utf-8")), path.name
    if not isinstance(record, dict) or not record.get("runs"):
        raise ValueError(
            f"{source} holds no scoring runs: it is not a scores file written by "
            "helpers.generate_model_scores (notebook 09_scoring_the_responses)."
        )
    return record


def scored_entries(run: dict) -> list[dict]:
    """The entries of one finished scoring run, in the order of the responses."""
    entries = sorted(run["entries"], key=lambda e: e["index"])
    if "summary" not in run or [e["index"] for e in entries] != list(range(len(entries))):
        raise ValueError(
            f"Run {run['run']} is unfinished: run generate_model_scores(..., run={run['run']}) "
            "again to complete it."
        )
    return entries


def score_table(scores: str | Path | dict) -> np.ndarray:
    """The scores of every run as an array [runs, entries], NaN where none was readable.

    All runs must have scored the same responses: a run left from before notebook 07 ran
    again is refused, with a message saying how to score it anew.
    """
    record = read_scores(scores)
    first = [e["prompt"] for e in scored_entries(record["runs"][0])]
    rows = []
    for run in record["runs"]:
        entries = scored_entries(run)
        if [e["prompt"] for e in entries] != first:
            raise ValueError(
                f"Run {run['run']} scored other responses than run {record['runs'][0]['run']} "
                "(did notebook 07 run again since?). Score it again: "
                f"generate_model_scores(..., run={run['run']})."
            )
        rows.append([np.nan if e["score"] is None else float(e["score"]) for e in entries])
    return np.array(rows, dtype=float)


def run_averages(table: np.ndarray) -> list[float]:
    """The average readable score of each run (each row of a `score_table`)."""
    averages = []
    for row in table:
        readable = row[~np.isnan(row)]
        averages.append(float(readable.mean()) if len(readable) else float("nan"))
    return averages


def summarize_runs(scores: str | Path | dict, top: int = 5) -> dict:
    """Mean ± standard deviation of the run averages, and the entries that vary most.

    The standard deviation is the sample one (n - 1) of the per-run averages: how much
    the average moves when the same responses are scored again. With one run it, and
    the spread (largest minus smallest run average), are None.
    """
    record = read_scores(scores)
    table = score_table(record)
    averages = run_averages(table)
    ranges = []
    for column in table.T:
        readable = column[~np.isnan(column)]
        ranges.append(float(readable.max() - readable.min()) if len(readable) > 1 else 0.0)
    order = sorted(range(len(ranges)), key=lambda i: (-ranges[i], i))
    most_varying = [
        {
            "index": i,
            "scores": [None if np.isnan(s) else int(s) for s in table[:, i]],
            "range": ranges[i],
        }
        for i in order[:top]
        if ranges[i] > 0
    ]
    several = len(averages) > 1
    return {
        "runs": len(averages),
        "seeds": [run.get("options", {}).get("seed") for run in record["runs"]],
        "run_averages": averages,
        "mean": float(np.mean(averages)),
        "std": float(np.std(averages, ddof=1)) if several else None,
        "spread": max(averages) - min(averages) if several else None,
        "entries": table.shape[1],
        "entries_that_vary": sum(r > 0 for r in ranges),
        "most_varying": most_varying,
    }


def format_run_summary(summary: dict, name: str = "scores") -> str:
    """A few lines for a person: the average over runs and the entries that vary most."""
    if summary["runs"] == 1:
        return (
            f"{name}: 1 run, average {summary['mean']:.2f}\n"
            "  One run cannot show how much the judge's average moves: score again "
            "(COURSE_JUDGE_RUNS=3) to see."
        )
    averages = ", ".join(f"{a:.2f}" for a in summary["run_averages"])
    lines = [
        f"{name}: {summary['runs']} runs (seeds {summary['seeds']}), average "
        f"{summary['mean']:.2f} ± {summary['std']:.2f} (mean ± standard deviation of the run "
        f"averages {averages})",
        f"  entries whose score changed between runs: {summary['entries_that_vary']} "
        f"of {summary['entries']}",
    ]
    for item in summary["most_varying"]:
        scores = ", ".join("-" if s is None else str(s) for s in item["scores"])
        lines.append(f"  entry {item['index']:3}: {scores} (range {item['range']:.0f})")
    return "\n".join(lines)


def judged_task(prompt: str) -> str:
    """The part of a judge prompt that names the test entry (without the response)."""
    return prompt.split(", score the model response `")[0]


def compare_scores(
    scores_a: str | Path | dict,
    scores_b: str | Path | dict,
    names: tuple[str, str] = ("A", "B"),
    resamples: int = 10_000,
    seed: int = 123,
) -> dict:
    """Compare two scored response sets entry by entry (paired): is the difference real?

    Both files must score responses to the same test entries. Each entry's score is its
    average over its file's runs, and the difference d = A - B is taken per entry, so how
    hard an entry is cancels out. Reports the mean of d, its standard error
    (sd(d) / sqrt(n)) and a 95% bootstrap interval (the entries resampled `resamples`
    times with a fixed `seed`). The difference is within the judge's noise when that
    interval includes 0, or when it is no larger than the spread of the run averages of
    either file (the same responses scored again).
    """
    record_a, record_b = read_scores(scores_a), read_scores(scores_b)
    table_a, table_b = score_table(record_a), score_table(record_b)
    name_a, name_b = names
    if table_a.shape[1] != table_b.shape[1]:
        raise ValueError(
            f"{name_a} has {table_a.shape[1]} scored entries and {name_b} {table_b.shape[1]}: "
            "a paired comparison needs scores of responses to the same test entries."
        )
    tasks_a = [judged_task(e["prompt"]) for e in scored_entries(record_a["runs"][0])]
    tasks_b = [judged_task(e["prompt"]) for e in scored_entries(record_b["runs"][0])]
    for i, (task_a, task_b) in enumerate(zip(tasks_a, tasks_b, strict=True)):
        if task_a != task_b:
            raise ValueError(
                f"Entry {i} is another test entry in {name_a} than in {name_b}: compare "
                "responses to the same test set (the same split of notebook 01)."
            )

    def entry_means(table: np.ndarray) -> np.ndarray:
        counts = (~np.isnan(table)).sum(axis=0)
        return np.where(counts > 0, np.nansum(table, axis=0) / np.maximum(counts, 1), np.nan)

    a, b = entry_means(table_a), entry_means(table_b)
    keep = ~np.isnan(a) & ~np.isnan(b)
    d = a[keep] - b[keep]
    n = len(d)
    if n < 2:
        raise ValueError(f"Only {n} entries have a readable score in both files: too few.")
    mean = float(d.mean())
    std = float(d.std(ddof=1))
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = (float(x) for x in np.percentile(boot, [2.5, 97.5]))

    spreads = []
    for table in (table_a, table_b):
        averages = run_averages(table)
        spreads.append(max(averages) - min(averages) if len(averages) > 1 else None)
    measured = [s for s in spreads if s is not None]
    judge_noise = max(measured) if measured else None
    includes_zero = low <= 0 <= high
    below_noise = judge_noise is not None and abs(mean) <= judge_noise

    interval = f"[{low:+.2f}, {high:+.2f}]"
    if includes_zero:
        verdict = (
            f"Within the judge's noise: the 95% interval of the difference, {interval}, "
            f"includes 0, so these scores do not show that {name_a} and {name_b} differ."
        )
    elif below_noise:
        verdict = (
            f"Within the judge's noise: the difference, {mean:+.2f} points, is no larger than "
            f"the {judge_noise:.2f} points by which repeated runs of the same responses moved "
            "the average."
        )
    else:
        higher, lower = (name_a, name_b) if mean > 0 else (name_b, name_a)
        verdict = (
            f"{higher} scores {abs(mean):.2f} points higher than {lower}: the 95% interval of "
            f"the difference, {interval}, excludes 0"
            + (
                f" and the difference exceeds the {judge_noise:.2f}-point spread between "
                "repeated runs."
                if judge_noise is not None
                else "."
            )
        )
    notes = []
    if judge_noise is None:
        notes.append(
            "Each file holds one run, so how much the judge's average moves between runs is "
            f"not measured; the book's three runs of the same responses spanned "
            f"{BOOK_JUDGE_SPREAD:.2f} points (49.45 to 51.75). Score more runs "
            "(COURSE_JUDGE_RUNS=3) to measure it."
            + (
                " A difference this small is within what the book's runs varied."
                if abs(mean) <= BOOK_JUDGE_SPREAD
                else ""
            )
        )
    judge_a, judge_b = record_a["judge"], record_b["judge"]
    for key, what in (("digest", "judge models"), ("options", "judge options")):
        if judge_a.get(key) != judge_b.get(key):
            notes.append(
                f"The two files were scored with different {what} ({judge_a.get(key)} and "
                f"{judge_b.get(key)}): the difference mixes the responses with the judges."
            )
    versions = {r.get("ollama_version") for r in record_a["runs"] + record_b["runs"]}
    if len(versions) > 1:
        notes.append(f"The runs used different Ollama versions: {sorted(map(str, versions))}.")

    return {
        "names": [name_a, name_b],
        "entries": len(a),
        "paired": n,
        "left_out": int(len(a) - n),
        "runs": [table_a.shape[0], table_b.shape[0]],
        "average_a": float(a[keep].mean()),
        "average_b": float(b[keep].mean()),
        "mean_difference": mean,
        "std_difference": std,
        "standard_error": std / np.sqrt(n),
        "ci95": [low, high],
        "bootstrap": {"resamples": resamples, "seed": seed},
        "run_spread": spreads,
        "judge_noise": judge_noise,
        "within_noise": bool(includes_zero or below_noise),
        "a_higher": int((d > 0).sum()),
        "b_higher": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "differences": [
            {"index": int(i), "a": float(a[i]), "b": float(b[i]), "difference": float(a[i] - b[i])}
            for i in np.flatnonzero(keep)
        ],
        "verdict": verdict,
        "notes": notes,
    }


def format_comparison(comparison: dict) -> str:
    """The report of `compare_scores` for a person, ending with its verdict."""
    c = comparison
    name_a, name_b = c["names"]
    runs_a, runs_b = (f"{k} run" if k == 1 else f"{k} runs" for k in c["runs"])
    spreads = [
        f"{name}: not measured (1 run)" if spread is None else f"{name}: {spread:.2f} points"
        for name, spread in zip(c["names"], c["run_spread"], strict=True)
    ]
    lines = [
        f"Paired comparison of {name_a} (A) and {name_b} (B), entry by entry",
        f"  entries scored in both   {c['paired']} of {c['entries']}"
        + (f" ({c['left_out']} without a readable score left out)" if c["left_out"] else ""),
        f"  average score            A {c['average_a']:.2f} ({runs_a}), "
        f"B {c['average_b']:.2f} ({runs_b})",
        f"  difference A - B         {c['mean_difference']:+.2f} points, "
        f"standard error {c['standard_error']:.2f}",
        f"  95% interval             [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] (bootstrap: "
        f"{c['bootstrap']['resamples']:,} resamples of the entries, seed {c['bootstrap']['seed']})",
        f"  entries                  A higher {c['a_higher']}, B higher {c['b_higher']}, "
        f"tied {c['ties']}",
        f"  run-to-run spread        {'; '.join(spreads)}",
        "",
        c["verdict"],
    ]
    lines += [f"Note: {note}" for note in c["notes"]]
    return "\n".join(lines)
