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
import json
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
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
            "chapter's losses wrongly on it: using the CPU. Install torch>=2.9 to use it."
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
                f"{source}: entry {index} is a {type(entry).__name__}, not an object "
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
                    f'{source}: entry {index}, field "{field}" is a '
                    f"{type(entry[field]).__name__}, not a string. Fix that entry."
                )
    return data


def download_and_load_file(file_path: str | Path, url: str) -> list[dict]:
    """Download the dataset when `file_path` is missing, then load and validate it."""
    file_path = Path(file_path)
    if not file_path.exists():
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ConnectionError(
                f"Could not download {url}: {describe_network_error(exc)}\n"
                f"Download it by hand and save it as {file_path}."
            ) from exc
        write_atomic(file_path, payload)
    text = file_path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{file_path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
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
    for seq, prompt_length in zip(sequences, prompt_lengths):
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


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention, with the book's parameter names."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"emb_dim {d_out} must be divisible by n_heads {num_heads}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # kept so that a .pth saved by the book's code loads here and back
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1)
        )

    def forward(self, x):
        b, num_tokens, _ = x.shape
        # (b, tokens, d_out) -> (b, heads, tokens, head_dim)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context = (attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    """Layer normalization with the book's `scale` and `shift` parameters."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


class FeedForward(nn.Module):
    """Expand to 4 x emb_dim, GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward, each with a shortcut connection."""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token and position embeddings, transformer blocks, final norm, output head."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        _, seq_len = in_idx.shape
        positions = torch.arange(seq_len, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


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
        logits = logits[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            min_val = top_logits[:, -1]
            logits = torch.where(
                logits < min_val, torch.tensor(float("-inf")).to(logits.device), logits
            )
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


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


def describe_network_error(exc: BaseException) -> str:
    """A short explanation of a failed download, with the usual fix."""
    reason = getattr(exc, "reason", exc)
    text = str(reason)
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in type(reason).__name__.upper():
        return (
            f"{text}. The TLS certificate could not be verified: on macOS run "
            "'Install Certificates.command' of your Python; behind a company proxy set "
            "SSL_CERT_FILE to its certificate bundle."
        )
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    return (
        f"{text}. Check the internet connection; behind a proxy set HTTPS_PROXY "
        "(for example HTTPS_PROXY=http://proxy:8080)."
    )


def download_file(url: str, destination: str | Path, show_progress: bool = True) -> Path:
    """Download `url` to `destination`, resuming a partial download.

    Bytes arrive in `destination.part`; the file gets its final name only when
    complete, so an existing `destination` is always whole and is skipped.
    """
    from tqdm.auto import tqdm

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
        if exc.code != 416:  # 416: the part file already holds everything
            raise
        os.replace(part, destination)
        return destination
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
    os.replace(part, destination)
    return destination


def download_and_load_gpt2(
    model_size: str,
    models_dir: str | Path,
    base_url: str = GPT2_BASE_URL,
    backup_base_url: str = GPT2_BACKUP_BASE_URL,
) -> tuple[dict, dict]:
    """Download OpenAI's GPT-2 checkpoint (if needed) and return `(settings, params)`.

    `model_size` is "124M", "355M", "774M", "1558M", or "offline" for the tiny
    random-weight checkpoint that `write_offline_gpt2` makes with no network.
    """
    model_dir = Path(models_dir) / model_size
    if model_size == "offline":
        write_offline_gpt2(model_dir)
    else:
        if model_size not in ("124M", "355M", "774M", "1558M"):
            raise ValueError(f'model_size {model_size!r}: use "124M", "355M", "774M" or "1558M".')
        failed = []
        for filename in GPT2_FILES:
            errors = []
            for base in (base_url, backup_base_url):
                try:
                    download_file(f"{base}/{model_size}/{filename}", model_dir / filename)
                    break
                except (urllib.error.URLError, OSError) as exc:
                    errors.append(f"{base}: {describe_network_error(exc)}")
            else:
                failed.append((filename, errors))
        if failed:
            lines = [f"  {name}  ({'; '.join(errs)})" for name, errs in failed]
            raise ConnectionError(
                f"Could not download {len(failed)} of the GPT-2 {model_size} files from "
                "either source:\n" + "\n".join(lines) + "\n"
                f"Put these files into {model_dir.resolve()} (for example copied from a "
                "machine that has them) and run the cell again, or choose the offline model."
            )
    settings = json.loads((model_dir / "hparams.json").read_text())
    params = load_gpt2_params_from_tf_ckpt(tf_checkpoint_path(model_dir), settings)
    return settings, params


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
    for b, (block, p) in enumerate(zip(gpt.trf_blocks, params["blocks"])):
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


def write_offline_gpt2(model_dir: str | Path, seed: int = 123) -> Path:
    """Write a tiny GPT-2 checkpoint with random weights in OpenAI's exact layout.

    Same seven files as a real download, written with TensorFlow, so that loading
    it runs the very code that loads a real GPT-2. Its answers are noise. Files that
    already exist are kept.
    """
    model_dir = Path(model_dir)
    if all((model_dir / name).exists() for name in GPT2_FILES):
        return model_dir
    import tensorflow as tf

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
    hparams = {"n_vocab": vocab, "n_ctx": ctx, "n_embd": d, "n_head": cfg["n_heads"], "n_layer": n_layers}
    write_tf_checkpoint(model_dir, arrays, hparams)
    return model_dir


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
    """Mean cross-entropy over the batch's targets; -100 targets are ignored."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model: nn.Module, device, num_batches: int | None = None) -> float:
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
    token_ids = generate(model, encoded, max_new_tokens=50, context_size=context_size)
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
