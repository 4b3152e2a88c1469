"""LoRA fine-tuning (exercise 7.4): freeze GPT-2, add adapters, save plain merged weights.

Used by notebook 05 and `course.finetune`. The layers are the book's (appendix E,
`helpers.LinearWithLoRA`) or, in notebook 05, the student's once their check says right.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import helpers


def parameter_counts(model: nn.Module) -> dict:
    """{"total": ..., "trainable": ...}: numbers of parameters, all and with gradients."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def is_lora_layer(module: nn.Module) -> bool:
    """A LinearWithLoRA, the book's or one written like it: an nn.Linear `linear` and a
    `lora` with A, B and alpha."""
    lora = getattr(module, "lora", None)
    return isinstance(getattr(module, "linear", None), nn.Linear) and all(
        hasattr(lora, part) for part in ("A", "B", "alpha")
    )


def lora_layers(model: nn.Module) -> dict:
    """{name: module} of the LoRA layers in `model` (see is_lora_layer)."""
    return {name: module for name, module in model.named_modules() if is_lora_layer(module)}


def apply_lora(model: nn.Module, rank: int, alpha: float, replace_linear_with_lora=None) -> dict:
    """Freeze every weight of `model`, then wrap each nn.Linear in a LinearWithLoRA.

    As in the book's exercise solution: afterwards only the adapters' A and B
    matrices train. `replace_linear_with_lora` is the book's (helpers.py) unless
    another is given (notebook 05: the student's). Returns the parameter counts
    before and after, and the number of linear layers replaced. Draws A's random
    start from torch's generator (seed first).
    """
    if lora_layers(model):
        raise ValueError("This model has LoRA layers already: apply_lora once per model.")
    replace = replace_linear_with_lora or helpers.replace_linear_with_lora
    before = parameter_counts(model)
    device = next(model.parameters()).device
    for param in model.parameters():
        param.requires_grad = False
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    replace(model, rank, alpha)
    model.to(device)  # the new A and B are made on the CPU
    return {"before": before, "after": parameter_counts(model), "layers": linears}


def lora_parameter_count(model_cfg: dict, rank: int) -> int:
    """The adapters' parameter count for a GPTModel configuration: rank x (in + out)
    for each linear layer (4 in attention and 2 in the feed-forward part of each block,
    plus the output layer)."""
    d, vocab = model_cfg["emb_dim"], model_cfg["vocab_size"]
    per_block = 4 * rank * (d + d) + 2 * rank * (d + 4 * d)
    return model_cfg["n_layers"] * per_block + rank * (d + vocab)


def merged_state_dict(model: nn.Module) -> dict:
    """A plain GPTModel state_dict of a model with LoRA layers.

    Each LinearWithLoRA becomes one linear layer with weight W + alpha * (A @ B).T
    (nn.Linear stores W as (out, in), A @ B is (in, out)) and the same bias, under the
    names the layer had before LoRA. Computes in fp32; the model is not changed.
    """
    state = model.state_dict()
    merged = {}
    lora_prefixes = lora_layers(model)
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        owner, _, part = prefix.rpartition(".")
        if part == "lora" and owner in lora_prefixes:
            continue  # folded into the weight below
        if part == "linear" and owner in lora_prefixes:
            if leaf == "weight":
                lora = lora_prefixes[owner].lora
                delta = lora.alpha * (lora.A.detach() @ lora.B.detach()).T  # (out, in)
                value = (value.float() + delta.float()).to(value.dtype)
            merged[f"{owner}.{leaf}"] = value.detach().clone()
        else:
            merged[key] = value.detach().clone()
    return merged


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA in `model` by its merged nn.Linear, in place."""
    for name, module in model.named_children():
        if is_lora_layer(module):
            linear = module.linear
            lora = module.lora
            linear.weight += lora.alpha * (lora.A @ lora.B).T
            setattr(model, name, linear)
        else:
            merge_lora(module)
    return model
