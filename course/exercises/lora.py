"""Exercise 7.4: the check of the student's LoRA layer and replacement function (notebook 05)."""

from __future__ import annotations

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


def _close(a, b) -> bool:
    import torch

    return tuple(a.shape) == tuple(b.shape) and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _forward_hint(x, layer, got) -> str:
    """Why `got`, the student's LinearWithLoRA output for `x`, differs from the book's."""
    import torch

    with torch.no_grad():
        plain = layer.linear(x)
        update = x @ layer.lora.A @ layer.lora.B
    alpha = layer.lora.alpha
    if _close(got, plain + update):
        return (
            "the adapter's part is not scaled by alpha: LoRALayer.forward multiplies "
            "x @ A @ B by alpha, so add self.lora(x) rather than computing x @ A @ B yourself."
        )
    if _close(got, alpha * update) or _close(got, update):
        return "the frozen layer's own output is missing: return self.linear(x) + self.lora(x)."
    if _close(got, plain):
        return "the adapter's part is missing: add self.lora(x) to self.linear(x)."
    return "a LinearWithLoRA computes self.linear(x) + self.lora(x): the layer, plus the update."


def _tensor_text(t) -> str:
    return str([round(v, 4) for v in t.flatten()[:4].tolist()]) + " ..."


def _check_forward(LinearWithLoRA):
    """The student's forward on one layer: a no-op at the start, then with B set."""
    import torch
    import torch.nn as nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear = nn.Linear(4, 3)
        layer = LinearWithLoRA(linear, 2, 2.0)
        x = torch.randn(2, 5, 4)  # (batch, tokens, in_features), as inside GPT
        b_values = torch.randn(2, 3)
    what = "LinearWithLoRA(nn.Linear(4, 3), rank=2, alpha=2.0) on an input of shape (2, 5, 4)"
    with torch.no_grad():
        expected = linear(x)
        kind, got = call(layer, x)
    if kind == "value" and got is None:
        return None  # forward not written yet
    if kind == "error":
        return wrong(
            "7.4",
            what,
            "a tensor of shape (2, 5, 3)",
            f"{type(got).__name__}: {got}",
            "forward raised an error; it gets x of shape (..., in_features).",
        )
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (2, 5, 3):
        return wrong(
            "7.4",
            what,
            "a tensor of shape (2, 5, 3)",
            tuple(got.shape) if isinstance(got, torch.Tensor) else got,
            "return the output of the linear layer plus the adapter's, both (..., out_features).",
        )
    if not _close(got, expected):
        lora = getattr(layer, "lora", None)
        b_zero = lora is not None and torch.count_nonzero(lora.B).item() == 0
        hint = (
            "at the start B is zero, so the LoRA layer must add nothing: the output equals "
            "the plain layer's. "
            + (
                "Here B is zero, yet the output differs: " + _forward_hint(x, layer, got.detach())
                if b_zero
                else "Here B is not zero: keep LoRALayer as given (B = torch.zeros), so the "
                "fine-tuning starts from the pretrained model."
            )
        )
        return wrong(
            "7.4",
            what + ", at the start (B is zero)",
            _tensor_text(expected),
            _tensor_text(got.detach()),
            hint,
        )
    with torch.no_grad():
        layer.lora.B.copy_(b_values)
        expected = linear(x) + 2.0 * (x @ layer.lora.A @ layer.lora.B)
        got = layer(x)
    if not _close(got, expected):
        return wrong(
            "7.4",
            what + ", after B was set to random values",
            _tensor_text(expected),
            _tensor_text(got),
            _forward_hint(x, layer, got),
        )
    return "forward"


def _linear_names(model) -> list[str]:
    import torch.nn as nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _module_at(model, name: str):
    for part in name.split("."):
        model = getattr(model, part, None)
    return model


def check_lora(LinearWithLoRA, replace_linear_with_lora) -> Result:
    """Exercise 7.4: the student's `LinearWithLoRA` (its forward) and
    `replace_linear_with_lora(model, rank, alpha)`, against the book's appendix E.

    Checks, in order: the layer is a no-op at the start and computes
    linear(x) + alpha * x A B; every nn.Linear of a small GPTModel (nested ones and
    `out_head`) is wrapped once, with the given rank and alpha; the model still computes
    what it computed; after freezing, gradients reach the adapters only; and GPT-2
    medium, built on the `meta` device (shapes only, no memory), has 7,898,384 trainable
    parameters at rank 16.
    """
    import torch

    import helpers

    forward = _check_forward(LinearWithLoRA)
    if isinstance(forward, Result):
        return forward

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = helpers.GPTModel(TINY_GPT_CONFIG).eval()
        token_ids = torch.randint(0, TINY_GPT_CONFIG["vocab_size"], (2, 6))
        with torch.no_grad():
            expected_logits = model(token_ids)
        names = _linear_names(model)
        originals = {name: _module_at(model, name) for name in names}
        for param in model.parameters():
            param.requires_grad = False
        kind, err = "value", None
        try:
            replace_linear_with_lora(model, 2, 3.0)  # in place
        except NotImplementedError:  # the scaffold, untouched
            pass
        except Exception as exc:  # the student's code may raise anything: report it
            kind, err = "error", exc
    what = "a small GPTModel (2 blocks), replace_linear_with_lora(model, rank=2, alpha=3.0)"
    if kind == "error":
        return wrong(
            "7.4",
            what,
            "every nn.Linear wrapped in a LinearWithLoRA",
            f"{type(err).__name__}: {err}",
            "replace_linear_with_lora raised an error; it changes `model` in place and "
            "returns nothing.",
        )
    wrapped = [name for name in names if isinstance(_module_at(model, name), LinearWithLoRA)]
    if not wrapped and forward is None:
        return not_attempted("7.4", "LinearWithLoRA.forward and replace_linear_with_lora")
    if forward is None:
        return wrong(
            "7.4",
            "LinearWithLoRA(nn.Linear(4, 3), rank=2, alpha=2.0) on an input of shape (2, 5, 4)",
            "a tensor of shape (2, 5, 3)",
            None,
            "LinearWithLoRA.forward returns nothing yet: return self.linear(x) + self.lora(x).",
        )
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
            f"{what}: the layer {name}",
            "a LinearWithLoRA",
            type(module).__name__,
            f"{len(names) - len(wrapped)} of {len(names)} linear layers were not replaced; " + hint,
        )
    for name in names:
        module = _module_at(model, name)
        inner = getattr(module, "linear", None)
        lora = getattr(module, "lora", None)
        if inner is not originals[name]:
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
                f"{what}: {name}.linear",
                "the model's original nn.Linear, wrapped once",
                type(inner).__name__,
                hint,
            )
        shape = tuple(getattr(lora, "A", torch.empty(0)).shape)
        if shape != (inner.in_features, 2) or getattr(lora, "alpha", None) != 3.0:
            return wrong(
                "7.4",
                f"{what}: {name}.lora",
                f"A of shape {(inner.in_features, 2)} and alpha 3.0",
                f"A of shape {shape} and alpha {getattr(lora, 'alpha', None)}",
                "pass replace_linear_with_lora's rank and alpha on to every LinearWithLoRA.",
            )
    with torch.no_grad():
        logits = model(token_ids)
    if not _close(logits, expected_logits):
        return wrong(
            "7.4",
            f"{what}: the logits for token ids {token_ids[0].tolist()}",
            _tensor_text(expected_logits),
            _tensor_text(logits),
            "with B zero the model with adapters must compute what it computed before.",
        )
    model.train()
    loss = torch.nn.functional.cross_entropy(
        model(token_ids).flatten(0, 1), token_ids.roll(-1, 1).flatten()
    )
    loss.backward()
    adapters = {
        f"{name}.lora.{part}" for name in names for part in ("A", "B")
    }  # the trainable parameters
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    stray = [name for name in with_grad if name not in adapters]
    missing = sorted(adapters - set(with_grad))
    if stray or missing:
        return wrong(
            "7.4",
            f"{what}, after freezing every weight first: parameters that get a gradient",
            "the adapters' A and B only",
            f"also {stray[0]}" if stray else f"none for {missing[0]}",
            "freeze first (requires_grad = False on every parameter), then replace: the "
            "adapters are new and train, the wrapped nn.Linear must stay the frozen one.",
        )

    with torch.device("meta"):  # GPT-2 medium's shapes, no memory
        medium = helpers.GPTModel(
            {**helpers.BASE_CONFIG, **helpers.model_configs["gpt2-medium (355M)"]}
        )
        for param in medium.parameters():
            param.requires_grad = False
        replace_linear_with_lora(medium, 16, 16)
    trainable = sum(p.numel() for p in medium.parameters() if p.requires_grad)
    if trainable != GPT2_MEDIUM_LORA_PARAMETERS:
        return wrong(
            "7.4",
            "GPT-2 medium (on the meta device), frozen, then replace_linear_with_lora(model, 16, 16)",
            f"{GPT2_MEDIUM_LORA_PARAMETERS:,} trainable parameters",
            f"{trainable:,}",
            "each of the 145 linear layers gets A (in, 16) and B (16, out), nothing else trains.",
        )
    return right(
        "7.4",
        f"The layer adds nothing while B is zero and alpha * x A B after; all {len(names)} "
        "linear layers of a small GPTModel (out_head included) are wrapped once, compute what "
        "they computed and only the adapters get gradients; GPT-2 medium at rank 16 trains "
        f"{GPT2_MEDIUM_LORA_PARAMETERS:,} parameters.",
    )
