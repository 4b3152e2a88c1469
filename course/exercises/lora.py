"""Exercise 7.4: the check of the student's LoRA layer and replacement function
(notebook 05; `course.exercises.lora_run` uses it to choose whose code trains the run).
"""

from __future__ import annotations

from .lora_layer import LAYER, check_layer, close, error_text, tensor_text
from .results import Result, call, not_attempted, right, wrong

# A GPTModel small enough to run in milliseconds, with the structure of GPT-2: 2 blocks
# of 6 linear layers each (query, key, value, output projection, 2 feed-forward), and
# the output layer.
TINY_GPT_CONFIG = {
    "vocab_size": 50,
    "context_length": 16,
    "drop_rate": 0.0,
    "qkv_bias": True,
    "emb_dim": 8,
    "n_layers": 2,
    "n_heads": 2,
}
GPT2_MEDIUM_LORA_PARAMETERS = 7_898_384  # rank 16: the exercise solution's count
SMALL_MODEL = "a small GPTModel (2 blocks), replace_linear_with_lora(model, rank=2, alpha=3.0)"


# -- the whole model -----------------------------------------------------------------------


def _linear_names(model) -> list[str]:
    import torch.nn as nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _module_at(model, name: str):
    for part in name.split("."):
        model = getattr(model, part, None)
    return model


def _small_model(replace_linear_with_lora):
    """A small frozen GPTModel, its logits before, its linear layers, and the outcome
    of the student's replace_linear_with_lora(model, 2, 3.0) on it."""
    import torch

    import helpers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = helpers.GPTModel(TINY_GPT_CONFIG).eval()
        token_ids = torch.randint(0, TINY_GPT_CONFIG["vocab_size"], (2, 6))
        with torch.no_grad():
            logits = model(token_ids)
        names = _linear_names(model)
        originals = {name: _module_at(model, name) for name in names}
        model.requires_grad_(False)
        outcome = call(lambda: replace_linear_with_lora(model, 2, 3.0))  # in place
    return model, token_ids, logits, originals, outcome


def _unreplaced_problem(model, originals, LinearWithLoRA) -> Result | None:
    """The first linear layer that was not wrapped, with a hint on why."""
    names = list(originals)
    wrapped = [name for name in names if isinstance(_module_at(model, name), LinearWithLoRA)]
    for name in names:
        module = _module_at(model, name)
        if isinstance(module, LinearWithLoRA):
            continue
        if name == "out_head":
            hint = (
                "out_head, the output layer, is an nn.Linear too and gets an adapter: the "
                "exercise's 7,898,384 trainable parameters include it."
            )
        elif "." in name and any("." not in n for n in wrapped):
            hint = (
                "the layers inside the transformer blocks were not replaced: for a child that "
                "is not an nn.Linear, call replace_linear_with_lora on it (recursion)."
            )
        else:
            hint = (
                "go through model.named_children(): replace each nn.Linear with setattr(model, "
                "name, LinearWithLoRA(module, rank, alpha)), recurse into every other child."
            )
        return wrong(
            "7.4",
            f"{SMALL_MODEL}: the layer {name}",
            "a LinearWithLoRA",
            type(module).__name__,
            f"{len(names) - len(wrapped)} of {len(names)} linear layers were not replaced; " + hint,
        )
    return None


def _wrapping_problem(model, originals, LinearWithLoRA) -> Result | None:
    """Each LinearWithLoRA wraps the model's own layer, once, with the given rank and alpha."""
    import torch

    for name, original in originals.items():
        module = _module_at(model, name)
        inner, lora = getattr(module, "linear", None), getattr(module, "lora", None)
        if inner is not original:
            if isinstance(inner, LinearWithLoRA):
                hint = (
                    "this layer is wrapped twice: after wrapping an nn.Linear, do not visit "
                    "the new LinearWithLoRA (recurse only into children that are not nn.Linear)."
                )
            else:
                hint = (
                    "wrap the model's own layer, LinearWithLoRA(module, rank, alpha): a new or "
                    "copied layer is not the frozen pretrained one."
                )
            return wrong(
                "7.4",
                f"{SMALL_MODEL}: {name}.linear",
                "the model's original nn.Linear, wrapped once",
                type(inner).__name__,
                hint,
            )
        shape = tuple(getattr(lora, "A", torch.empty(0)).shape)
        if shape != (inner.in_features, 2) or getattr(lora, "alpha", None) != 3.0:
            return wrong(
                "7.4",
                f"{SMALL_MODEL}: {name}.lora",
                f"A of shape {(inner.in_features, 2)} and alpha 3.0",
                f"A of shape {shape} and alpha {getattr(lora, 'alpha', None)}",
                "pass replace_linear_with_lora's rank and alpha on to every LinearWithLoRA.",
            )
    return None


def _computing_problem(model, token_ids, expected_logits, names) -> Result | None:
    """The model computes what it computed, and only the adapters get gradients."""
    import torch

    kind, logits = call(lambda: model(token_ids))
    if (
        kind == "error"
        or not isinstance(logits, torch.Tensor)
        or not close(logits, expected_logits)
    ):
        return wrong(
            "7.4",
            f"{SMALL_MODEL}: the logits for token ids {token_ids[0].tolist()}",
            tensor_text(expected_logits),
            error_text(logits) if kind == "error" else getattr(logits, "shape", logits),
            "with B zero the model with adapters must compute what it computed before.",
        )

    def backward():
        model.train()
        logits = model(token_ids)
        torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), token_ids.roll(-1, 1).flatten()
        ).backward()

    kind, err = call(backward)
    adapters = {f"{name}.lora.{part}" for name in names for part in ("A", "B")}
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    stray = [name for name in with_grad if name not in adapters]
    missing = sorted(adapters - set(with_grad))
    if kind == "error" or stray or missing:
        return wrong(
            "7.4",
            f"{SMALL_MODEL}, after freezing every weight first: parameters that get a gradient",
            "the adapters' A and B only",
            error_text(err)
            if kind == "error"
            else (f"also {stray[0]}" if stray else f"none for {missing[0]}"),
            "freeze first (requires_grad = False on every parameter), then replace: the "
            "adapters are new and train, the wrapped nn.Linear must stay the frozen one.",
        )
    return None


def _check_model(LinearWithLoRA, replace_linear_with_lora, forward) -> Result | int:
    """replace_linear_with_lora on a small GPTModel: a Result when something is wrong or
    nothing is written yet, else the number of linear layers it wrapped."""
    model, token_ids, logits, originals, (kind, err) = _small_model(replace_linear_with_lora)
    if kind == "error":
        return wrong(
            "7.4",
            SMALL_MODEL,
            "every nn.Linear wrapped in a LinearWithLoRA",
            error_text(err),
            "replace_linear_with_lora raised an error; it changes `model` in place and "
            "returns nothing.",
        )
    if not any(isinstance(m, LinearWithLoRA) for m in model.modules()) and forward is None:
        return not_attempted("7.4", "LinearWithLoRA.forward and replace_linear_with_lora")
    if forward is None:
        return wrong(
            "7.4",
            f"{LAYER} on an input of shape (2, 5, 4)",
            "a tensor of shape (2, 5, 3)",
            None,
            "LinearWithLoRA.forward returns nothing yet: return self.linear(x) + self.lora(x).",
        )
    return (
        _unreplaced_problem(model, originals, LinearWithLoRA)
        or _wrapping_problem(model, originals, LinearWithLoRA)
        or _computing_problem(model, token_ids, logits, list(originals))
        or len(originals)
    )


def _check_gpt2_medium(replace_linear_with_lora) -> Result | None:
    """GPT-2 medium on the meta device (shapes only), frozen, then rank 16: 7,898,384."""
    import torch

    import helpers

    def count():
        with torch.device("meta"):  # GPT-2 medium's shapes, no memory
            medium = helpers.GPTModel(
                {**helpers.BASE_CONFIG, **helpers.model_configs["gpt2-medium (355M)"]}
            )
            medium.requires_grad_(False)
            replace_linear_with_lora(medium, 16, 16)
        return sum(p.numel() for p in medium.parameters() if p.requires_grad)

    kind, trainable = call(count)
    if kind == "value" and trainable == GPT2_MEDIUM_LORA_PARAMETERS:
        return None
    return wrong(
        "7.4",
        "GPT-2 medium (on the meta device), frozen, then replace_linear_with_lora(model, 16, 16)",
        f"{GPT2_MEDIUM_LORA_PARAMETERS:,} trainable parameters",
        error_text(trainable) if kind == "error" else f"{trainable:,}",
        "each of the 145 linear layers gets A (in, 16) and B (16, out), nothing else trains.",
    )


def check_lora(LinearWithLoRA, replace_linear_with_lora) -> Result:
    """Exercise 7.4: the student's `LinearWithLoRA` (its forward) and
    `replace_linear_with_lora(model, rank, alpha)`, against the book's appendix E.

    Checks, in order: one layer adds nothing while B is zero and alpha * x A B once B is
    set, in train and in eval mode, with the input's dtype; through three stacked
    layers the adapters' gradients equal the course's solution's; every nn.Linear of a
    small GPTModel (nested ones and `out_head`) is wrapped once, with the given rank and
    alpha; the model still computes what it computed; after freezing, gradients reach
    the adapters only; and GPT-2 medium, built on the `meta` device (shapes only, no
    memory), has 7,898,384 trainable parameters at rank 16. The student's code runs
    under `call`: errors and endless loops become hints.
    """
    forward = check_layer(LinearWithLoRA)
    if isinstance(forward, Result):
        return forward
    layers = _check_model(LinearWithLoRA, replace_linear_with_lora, forward)
    if isinstance(layers, Result):
        return layers
    return _check_gpt2_medium(replace_linear_with_lora) or right(
        "7.4",
        f"The layer adds nothing while B is zero and alpha * x A B after, in train and eval "
        "mode, and passes the course's gradients back through three stacked layers; all "
        f"{layers} linear layers of a small GPTModel (out_head included) are wrapped once, "
        "compute what they computed and only the adapters get gradients; GPT-2 medium at "
        f"rank 16 trains {GPT2_MEDIUM_LORA_PARAMETERS:,} parameters.",
    )
