"""How a training run uses this machine: its number format (`choose_precision`,
`autocast_context`), AdamW's fused kernel (`make_optimizer`) and freed memory kept for
reuse (`keep_freed_memory`). Used by notebooks 05 and 10, course.training and benchmarks.
"""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn as nn


def keep_freed_memory() -> bool:
    """Let the C library keep freed memory for reuse (Linux with glibc; elsewhere a no-op).

    Every training step frees and asks again for the same large blocks; by default
    glibc returns blocks above a threshold to the system and gets them back with page
    faults, which costs a large share of a CPU training step. This is what the
    environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ do, set
    from inside the process. Returns True when it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl, for example)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    largest = 2**31 - 1  # mallopt takes an int
    return bool(libc.mallopt(m_mmap_threshold, largest)) and bool(
        libc.mallopt(m_trim_threshold, largest)
    )


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The book's AdamW, as PyTorch's fused kernel where this device and PyTorch have it.

    The same update rule as `torch.optim.AdamW(model.parameters(), lr=lr,
    weight_decay=weight_decay)`; the fused version updates all parameters in one pass
    instead of a dozen small operations per parameter (otherwise the multi-tensor one).
    """
    params = [p for p in model.parameters() if p.requires_grad]  # (LoRA freezes the rest)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused AdamW for this device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


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
