"""Exercise 7.4, the first half of the check: the student's LinearWithLoRA on one layer
and through three stacked layers (values, dtype, train and eval mode, and gradients
against the course's solution). `course.exercises.lora.check_lora` (notebook 05) runs it.
"""

from __future__ import annotations

from .results import Result, call, wrong

RANK, ALPHA = 2, 3.0  # for the one-layer checks: alpha, alpha / rank and 1 all differ
LAYER = f"LinearWithLoRA(nn.Linear(4, 3), rank={RANK}, alpha={ALPHA})"
STACK = f"three LinearWithLoRA(nn.Linear(4, 4), rank={RANK}, alpha={ALPHA}) in a row"


def close(a, b) -> bool:
    import torch

    return tuple(a.shape) == tuple(b.shape) and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def tensor_text(t) -> str:
    return str([round(v, 4) for v in t.flatten()[:4].tolist()]) + " ..."


def error_text(err) -> str:
    return f"{type(err).__name__}: {err}"


# -- one layer ---------------------------------------------------------------------------


def _build_layer(LinearWithLoRA, in_features=4, out_features=3):
    """(layer, None) with the student's class around a frozen nn.Linear, or (None, Result)."""
    import torch.nn as nn

    linear = nn.Linear(in_features, out_features)
    linear.requires_grad_(False)  # frozen, as in a LoRA run
    what = LAYER.replace("(4, 3)", f"({in_features}, {out_features})")
    kind, layer = call(lambda: LinearWithLoRA(linear, RANK, ALPHA))
    if kind == "error" or layer is None:
        got = error_text(layer) if kind == "error" else None
        return None, wrong("7.4", what, "a LinearWithLoRA", got, "keep __init__ as given.")
    lora = getattr(layer, "lora", None)
    shapes = [tuple(getattr(getattr(lora, name, None), "shape", ())) for name in ("A", "B")]
    if getattr(layer, "linear", None) is not linear or shapes != [
        (in_features, RANK),
        (RANK, out_features),
    ]:
        return None, wrong(
            "7.4",
            what,
            f"self.linear, the layer given, and self.lora with A {(in_features, RANK)}, "
            f"B {(RANK, out_features)}",
            f"A and B of shapes {shapes[0]} and {shapes[1]}",
            "keep __init__ as given: self.linear = linear and self.lora = LoRALayer(...).",
        )
    return layer, None


def _output_problem(kind, got, what, expected) -> Result | None:
    """A Result when the forward's output is an error, not a tensor, or of the wrong shape
    or dtype; None when it is a tensor like `expected`."""
    import torch

    shape = tuple(expected.shape)
    if kind == "error":
        return wrong(
            "7.4",
            what,
            f"a tensor of shape {shape}",
            error_text(got),
            "forward raised an error; it gets x of shape (..., in_features).",
        )
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape:
        return wrong(
            "7.4",
            what,
            f"a tensor of shape {shape}",
            tuple(got.shape) if isinstance(got, torch.Tensor) else got,
            "return the output of the linear layer plus the adapter's, both (..., out_features).",
        )
    if got.dtype != expected.dtype:
        return wrong(
            "7.4",
            what,
            f"dtype {expected.dtype}",
            f"dtype {got.dtype}",
            "keep the input's dtype: add the two parts as they are, without converting.",
        )
    return None


def _forward_hint(x, layer, got) -> str:
    """Why `got`, the student's LinearWithLoRA output for `x`, differs from the book's."""
    import torch

    with torch.no_grad():
        plain = layer.linear(x)
        update = x @ layer.lora.A @ layer.lora.B
    if close(got, plain + ALPHA / RANK * update):
        return (
            "your layer scales the update by alpha / rank: that is the other convention, the "
            "one of the repository's later version of appendix E. The printed appendix E, "
            "which this course follows, scales by alpha (LoRALayer.forward returns "
            "alpha * (x @ A @ B)). Both train; they differ by the factor rank, so the same "
            "alpha means updates rank times larger with the book's (16 against 1 at rank 16 "
            "and alpha 16). Return self.linear(x) + self.lora(x), so your layer computes "
            "the book's numbers and its merged weight W + alpha A B is what it computed."
        )
    if close(got, plain + update):
        return (
            "the adapter's part is not scaled by alpha: LoRALayer.forward multiplies "
            "x @ A @ B by alpha, so add self.lora(x) rather than computing x @ A @ B yourself."
        )
    if close(got, ALPHA * update) or close(got, update):
        return "the frozen layer's own output is missing: return self.linear(x) + self.lora(x)."
    if close(got, plain):
        return "the adapter's part is missing: add self.lora(x) to self.linear(x)."
    return "a LinearWithLoRA computes self.linear(x) + self.lora(x): the layer, plus the update."


def _check_start(layer, x):
    """Train mode, B zero: the layer must compute what the plain layer computes.
    None when forward is not written yet, a Result when it is wrong, else "forward"."""
    import torch

    what = f"{LAYER} on an input of shape (2, 5, 4)"
    with torch.no_grad():
        expected = layer.linear(x)
        kind, got = call(layer, x)
    if kind == "value" and got is None:
        return None  # forward not written yet
    problem = _output_problem(kind, got, what, expected)
    if problem:
        return problem
    if close(got, expected):
        return "forward"
    b_zero = torch.count_nonzero(layer.lora.B).item() == 0
    hint = (
        "at the start B is zero, so the LoRA layer must add nothing: the output equals the plain layer's. "
        + (
            "Here B is zero, yet the output differs: " + _forward_hint(x, layer, got.detach())
            if b_zero
            else "Here B is not zero: keep LoRALayer as given (B = torch.zeros), so the "
            "fine-tuning starts from the pretrained model."
        )
    )
    what += ", at the start (B is zero)"
    return wrong("7.4", what, tensor_text(expected), tensor_text(got.detach()), hint)


def _check_formula(layer, x) -> Result | None:
    """With B set to random values, in train and in eval mode: linear(x) + alpha * x A B."""
    import torch

    what = f"{LAYER} on an input of shape (2, 5, 4), after B was set to random values"
    with torch.no_grad():
        layer.lora.B.copy_(torch.randn(RANK, 3))
        expected = layer.linear(x) + ALPHA * (x @ layer.lora.A @ layer.lora.B)
        outputs = {}
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            kind, got = call(layer, x)
            problem = _output_problem(kind, got, f"{what}, in {mode} mode", expected)
            if problem:
                return problem
            outputs[mode] = got
    layer.train()
    wrong_modes = [mode for mode, got in outputs.items() if not close(got, expected)]
    if len(wrong_modes) == 2:
        got = outputs["train"]
        return wrong(
            "7.4", what, tensor_text(expected), tensor_text(got), _forward_hint(x, layer, got)
        )
    if wrong_modes:
        (mode,) = wrong_modes
        other = "eval" if mode == "train" else "train"
        return wrong(
            "7.4",
            f"{what}, in {mode} mode (layer.{mode}())",
            tensor_text(expected),
            tensor_text(outputs[mode]),
            f"your layer computes the right output in {other} mode only. The adapter is part "
            "of the fine-tuned model: generation and the evaluations run in eval mode and "
            "need it as much as training does. Compute self.linear(x) + self.lora(x) "
            "whatever self.training says (only dropout behaves differently in eval mode).",
        )
    return None


# -- gradients through stacked layers ------------------------------------------------------


def _stacks(LinearWithLoRA):
    """(the student's three stacked layers, the course's), with the same weights, A and B
    (B random, as after some training), or (None, Result)."""
    import copy

    import torch

    import helpers

    yours = []
    for _ in range(3):
        layer, problem = _build_layer(LinearWithLoRA, 4, 4)
        if problem:
            return None, problem
        yours.append(layer)
    for layer in yours:
        with torch.no_grad():
            layer.lora.B.copy_(torch.randn(RANK, 4))
    course = [helpers.LinearWithLoRA(copy.deepcopy(layer.linear), RANK, ALPHA) for layer in yours]
    for ours, theirs in zip(course, yours, strict=True):
        ours.lora.load_state_dict({"A": theirs.lora.A.detach(), "B": theirs.lora.B.detach()})
    return (yours, course), None


def _stack_gradients(layers, x, upstream):
    """The adapters' gradients, layer by layer, after backward from the stack's output."""
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    out = x
    for layer in layers:
        out = layer(out)
    (out * upstream).sum().backward()
    return [(layer.lora.A.grad, layer.lora.B.grad) for layer in layers]


def _gradient_hint(layer, x, upstream) -> str:
    """Which path of the student's layer passes no gradient back to its input `x`."""
    import torch

    x = x.clone().requires_grad_(True)
    kind, _ = call(lambda: (layer(x) * upstream).sum().backward())
    with torch.no_grad():
        through_linear = upstream @ layer.linear.weight
        through_lora = ALPHA * upstream @ (layer.lora.A @ layer.lora.B).T
    if kind == "error" or x.grad is None:
        return (
            "no gradient reaches the layer's input x: neither path may be cut off (no "
            "torch.no_grad(), no .detach()), or the adapters of earlier layers cannot learn."
        )
    if close(x.grad, through_lora):
        return (
            "the frozen layer's part passes no gradient back to x: is self.linear(x) computed "
            "under torch.no_grad() (or detached)? Its weights are frozen already "
            "(requires_grad = False); the gradient must still flow through it to the layers "
            "before, or their adapters learn from a wrong gradient. Compute self.linear(x) "
            "as it is."
        )
    if close(x.grad, through_linear):
        return (
            "the adapter's part passes no gradient back to x: does self.lora get x.detach()? "
            "The adapters of the layers before this one learn through this path too: give "
            "self.lora the input x itself."
        )
    return "return self.linear(x) + self.lora(x): both parts carry the gradient back to x."


def _check_gradients(LinearWithLoRA) -> Result | None:
    """The adapters' gradients through three stacked layers equal the course's solution's."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        stacks, problem = _stacks(LinearWithLoRA)
        if problem:
            return problem
        x, upstream = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    yours, course = stacks
    kind, got = call(lambda: _stack_gradients(yours, x, upstream))
    expected = _stack_gradients(course, x, upstream)
    what = f"{STACK}, B set to random values: the gradient of each adapter"
    if kind == "error":
        return wrong(
            "7.4", what, "gradients", error_text(got), "backward through your layers failed."
        )
    for index, (theirs, ours) in enumerate(zip(got, expected, strict=True)):
        for name, g, e in zip("AB", theirs, ours, strict=True):
            if g is None or not close(g, e):
                return wrong(
                    "7.4",
                    f"{what}: layer {index + 1}'s lora.{name}.grad",
                    tensor_text(e),
                    None if g is None else tensor_text(g),
                    _gradient_hint(yours[-1], x, upstream),
                )
    return None


def check_layer(LinearWithLoRA):
    """The student's forward: None (not written yet), a Result (wrong) or "forward"."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer, problem = _build_layer(LinearWithLoRA)
        if problem:
            return problem
        x = torch.randn(2, 5, 4)  # (batch, tokens, in_features), as inside GPT
        forward = _check_start(layer, x)
        if forward != "forward":
            return forward
        problem = _check_formula(layer, x)
    return problem or _check_gradients(LinearWithLoRA) or forward
