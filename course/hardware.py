"""Where the model runs: device choice, and the memory a GPT-2 size needs against what is free."""

from __future__ import annotations

import re

import torch

from course.settings import MODEL_NAMES, OFFLINE_MODEL, model_config, resolve_model_name


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
        for other in MODEL_NAMES
        if memory_needed(model_config(other), batch_size)["training"] <= have["free"]
    ]
    smaller = [n for n in fitting if n != OFFLINE_MODEL]
    suggestion = smaller[-1] if smaller else OFFLINE_MODEL
    print(
        f"Fine-tuning {name} probably does not fit: close other programs, use a smaller "
        f'batch size, or choose a smaller model, for example COURSE_MODEL="{suggestion.split(" ")[0]}".'
    )
    return suggestion
