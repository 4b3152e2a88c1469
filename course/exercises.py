"""Checks for the exercises a student writes (7.1, 7.2, 7.4).

Each notebook that teaches an exercise has a scaffold cell (the function's signature
and `# your code here`), a check cell that calls one of the `check_*` functions below
with the student's code, and a folded solution. A check runs the student's code on
concrete inputs against the book's behaviour (the course's own solution in
`helpers.py`) and returns a `Result`:

- `not attempted yet` while the scaffold is untouched (it returns None or raises
  NotImplementedError), so a notebook still runs to the end before the student writes
  anything;
- the first concrete difference (the input, what was expected, what came back) and a
  hint, when the code is wrong;
- what was checked, when it is right.

Printing a `Result` shows that message; `result.status` is "not attempted",
"wrong" or "right", for tests and for `run_course.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_ATTEMPTED = "not attempted yet"


@dataclass(frozen=True)
class Result:
    """What a check found: status ("not attempted", "wrong" or "right") and a message."""

    exercise: str
    status: str
    message: str

    def __str__(self) -> str:
        return f"Exercise {self.exercise}: {self.message}"

    def __repr__(self) -> str:  # the notebook shows the message when the cell ends on it
        return str(self)


def not_attempted(exercise: str, what: str) -> Result:
    """The scaffold is untouched: say so and what to write."""
    return Result(
        exercise, "not attempted", f"{NOT_ATTEMPTED}. Write {what} above, then run this cell again."
    )


def wrong(exercise: str, what: str, expected, got, hint: str) -> Result:
    """The first concrete difference: the input, what was expected and what came back."""
    message = (
        f"not right yet.\n  input:    {what}\n  expected: {expected!r}\n  got:      {got!r}\n"
        f"  hint:     {hint}"
    )
    return Result(exercise, "wrong", message)


def right(exercise: str, checked: str) -> Result:
    """Every case passed: say what was checked."""
    return Result(exercise, "right", f"right. {checked}")


# ---------------------------------------------------------------------------
# Exercise 7.1: the Phi-3 prompt style (notebook 01)
# ---------------------------------------------------------------------------

# Entries with and without an input, and one whose input spans two lines.
PHI3_ENTRIES = (
    {
        "instruction": "Identify the correct spelling of the following word.",
        "input": "Ocassion",
        "output": "The correct spelling is 'Occasion.'",
    },
    {
        "instruction": "What is an antonym of 'complicated'?",
        "input": "",
        "output": "An antonym of 'complicated' is 'simple'.",
    },
    {
        "instruction": "Convert 45 kilometers to meters.",
        "input": "",
        "output": "45 kilometers is 45000 meters.",
    },
    {
        "instruction": "Sort the following words alphabetically.",
        "input": "pear\napple",
        "output": "apple, pear",
    },
)


def _call(function, *args):
    """The student's function on fresh copies of `args`: ("value", v) or ("error", e)."""
    import copy

    try:
        return "value", function(*copy.deepcopy(args))
    except NotImplementedError:
        return "value", None
    except Exception as err:  # the student's code may raise anything: report it
        return "error", err


def _phi3_hint(entry: dict, expected: str, got: str) -> str:
    """What is most likely wrong with `got`, a Phi-3 prompt that differs from `expected`."""
    if "### " in got or got.startswith("Below is an instruction"):
        return (
            "that is the Alpaca template. Phi-3 has no preamble and no '###' headings: "
            "'<|user|>', a newline, the instruction."
        )
    if "<|assistant|>" in got:
        return (
            "format_input gives the prompt only; the '<|assistant|>:' line and the output "
            "belong to the response part (helpers.format_response)."
        )
    if not got.startswith("<|user|>\n"):
        return "the prompt starts with the '<|user|>' marker on a line of its own, then the instruction."
    if not entry["input"] and got.startswith(expected):
        return (
            "this entry's input is empty: add nothing after the instruction (no newline, "
            "no empty line, no input section)."
        )
    if got.rstrip("\n") == expected and got != expected:
        return (
            "no newline at the end: the response part that follows begins with its own "
            "'\\n<|assistant|>:'."
        )
    if entry["input"] and entry["input"] not in got:
        return "this entry has an input: put it on the line after the instruction."
    if entry["input"] and got.replace("\n\n", "\n") == expected:
        return "one newline between the instruction and the input, not an empty line."
    return (
        "compare expected and got character by character: '<|user|>', a newline, the "
        "instruction and, when the input is not empty, a newline and the input."
    )


def check_format_input_phi3(format_input_phi3) -> Result:
    """Exercise 7.1: `format_input_phi3(entry)` against helpers.format_input(entry, "phi3")."""
    import helpers

    what = "format_input_phi3"
    # every expected prompt first: nothing the student's code changes can alter them
    expected_prompts = [helpers.format_input(entry, "phi3") for entry in PHI3_ENTRIES]
    for number, (entry, expected) in enumerate(zip(PHI3_ENTRIES, expected_prompts, strict=True)):
        kind, got = _call(format_input_phi3, entry)
        if kind == "value" and got is None and number == 0:
            return not_attempted("7.1", what)
        if kind == "error":
            return wrong(
                "7.1",
                repr(entry),
                expected,
                f"{type(got).__name__}: {got}",
                "the function raised an error on this entry; it must accept any entry with "
                'the three fields, with "input" empty or not.',
            )
        if not isinstance(got, str):
            return wrong(
                "7.1",
                repr(entry),
                expected,
                got,
                "return the prompt as one string (a str), built from the entry's fields.",
            )
        if got != expected:
            return wrong("7.1", repr(entry), expected, got, _phi3_hint(entry, expected, got))
    with_input = sum(1 for entry in PHI3_ENTRIES if entry["input"])
    return right(
        "7.1",
        f"{len(PHI3_ENTRIES)} entries ({with_input} with an input, one of them on two lines; "
        f'{len(PHI3_ENTRIES) - with_input} without) give the very prompts of helpers.format_input(entry, "phi3").',
    )


# ---------------------------------------------------------------------------
# Exercise 7.2: masking the instruction in the collate function (notebook 02)
# ---------------------------------------------------------------------------

# A toy batch of (token_ids, prompt_length) pairs, with ids that are easy to follow:
# row 0 is the longest (no padding), rows 1 and 2 are padded.
TOY_MASKING_BATCH = (
    ([10, 11, 12, 13, 14, 15], 4),
    ([20, 21, 22], 2),
    ([30, 31, 32, 33], 3),
)

# Two real entries, tokenized as InstructionDataset(..., with_prompt_length=True) does.
REAL_MASKING_ENTRIES = PHI3_ENTRIES[:3]


def _masking_batches():
    """The batches the check collates: the toy batch, then a real Alpaca batch."""
    import helpers

    dataset = helpers.InstructionDataset(
        list(REAL_MASKING_ENTRIES), helpers.get_tokenizer(), with_prompt_length=True
    )
    real = tuple((list(ids), length) for ids, length in (dataset[i] for i in range(len(dataset))))
    return [("the toy batch", TOY_MASKING_BATCH), ("a batch of three real entries", real)]


def _ignored_positions(targets, ignore_index=-100) -> str:
    """The positions of each row that are ignore_index, as short ranges: '0-2, 5'."""
    lines = []
    for row, values in enumerate(targets.tolist()):
        positions = [i for i, value in enumerate(values) if value == ignore_index]
        ranges, start = [], None
        for i, position in enumerate(positions):
            if start is None:
                start = position
            if i + 1 == len(positions) or positions[i + 1] != position + 1:
                ranges.append(str(start) if start == position else f"{start}-{position}")
                start = None
        lines.append(f"row {row}: {', '.join(ranges) or 'none'}")
    return "; ".join(lines)


def _masking_hint(row_item, position: int, expected: int, got: int, plain_target: int) -> str:
    """Why target `position` of a row is wrong, given the row's (token_ids, prompt_length)."""
    token_ids, prompt_length = row_item
    last_prompt_target = prompt_length - 2  # targets 0..prompt_length-2 are prompt tokens
    if position == prompt_length - 1 and got == -100:
        return (
            "off by one: the targets are the inputs shifted by one, so target position i "
            "holds token i + 1. Mask the first prompt_length - 1 targets; target "
            "prompt_length - 1 is the first token of the response and must count."
        )
    if position <= last_prompt_target and expected == -100 and got == plain_target:
        if position == last_prompt_target:
            return (
                "off by one: target position i holds token i + 1, so the prompt's last token "
                "sits at target prompt_length - 2. Mask the first prompt_length - 1 targets."
            )
        return (
            "this target is a prompt token and must be -100: in each row, set the first "
            "prompt_length - 1 targets to ignore_index."
        )
    if position == len(token_ids) - 1 and got == -100:
        return (
            "this is the row's first <|endoftext|> target: keep it (it teaches the model to "
            "stop); only the padding after it becomes -100."
        )
    if position >= len(token_ids) and expected == -100:
        return (
            "padding beyond the row's first <|endoftext|> target must be -100 as in draft 3: "
            "from target position len(token_ids) on."
        )
    if got == -100:
        return "this target is a response token: it must count, not be -100."
    return (
        "the targets are the inputs shifted by one position (draft 2), with the first "
        "<|endoftext|> of each row kept."
    )


def check_instruction_masking(collate) -> Result:
    """Exercise 7.2: `collate(batch)` on (token_ids, prompt_length) items.

    Expected: helpers.custom_collate_fn(batch, mask_instructions=True): the inputs of
    draft 3, and targets with the padding after the first <|endoftext|> and the first
    prompt_length - 1 targets of every row set to -100.
    """
    import torch

    import helpers

    what = "custom_collate_with_masking"
    checked = []
    # every expected tensor first: nothing the student's code changes can alter them
    cases = []
    for name, batch in _masking_batches():
        items = [(list(ids), length) for ids, length in batch]
        expected = helpers.custom_collate_fn(items, mask_instructions=True)
        plain = helpers.custom_collate_fn([ids for ids, _ in items])
        cases.append((name, items, *expected, plain[1]))
    for number, (name, items, expected_inputs, expected_targets, plain_targets) in enumerate(cases):
        shown = repr(items) if number == 0 else f"{name} (prompt lengths {[n for _, n in items]})"
        kind, got = _call(collate, items)
        if kind == "value" and got is None and number == 0:
            return not_attempted("7.2", what)
        if kind == "error":
            return wrong(
                "7.2",
                shown,
                "(inputs, targets)",
                f"{type(got).__name__}: {got}",
                "the function raised an error; its batch is a list of (token_ids, "
                "prompt_length) pairs.",
            )
        if not (
            isinstance(got, tuple | list)
            and len(got) == 2
            and all(isinstance(t, torch.Tensor) for t in got)
        ):
            return wrong(
                "7.2",
                shown,
                "a pair of tensors (inputs, targets)",
                got,
                "return two tensors, as draft 3 does: torch.stack(inputs), torch.stack(targets).",
            )
        inputs, targets = (t.detach().cpu() for t in got)
        for label, want, have in (
            ("inputs", expected_inputs, inputs),
            ("targets", expected_targets, targets),
        ):
            if tuple(have.shape) != tuple(want.shape):
                return wrong(
                    "7.2",
                    f"{shown}, the shape of the {label}",
                    tuple(want.shape),
                    tuple(have.shape),
                    "pad every row to the longest item + 1, then drop one position: "
                    "(rows, longest item) for both tensors.",
                )
        if not torch.equal(inputs, expected_inputs):
            row, position = (inputs != expected_inputs).nonzero()[0].tolist()
            return wrong(
                "7.2",
                f"{shown}, inputs row {row}, position {position}",
                expected_inputs[row, position].item(),
                inputs[row, position].item(),
                "masking changes only the targets: the inputs are draft 3's, the padded "
                "tokens without the last position.",
            )
        if not torch.equal(targets, expected_targets):
            row, position = (targets != expected_targets).nonzero()[0].tolist()
            expected, have = expected_targets[row, position].item(), targets[row, position].item()
            hint = _masking_hint(
                items[row], position, expected, have, plain_targets[row, position].item()
            )
            return wrong(
                "7.2",
                f"{shown}, targets row {row} (prompt_length {items[row][1]}), position {position}",
                expected,
                have,
                hint + f" The -100 positions should be: {_ignored_positions(expected_targets)}.",
            )
        checked.append(f"{name} (-100 at {_ignored_positions(expected_targets)})")
    return right(
        "7.2",
        "The inputs and targets equal helpers.custom_collate_fn(batch, mask_instructions=True) on "
        + " and on ".join(checked)
        + ".",
    )


# ---------------------------------------------------------------------------
# Exercise 7.4: LoRA layers (notebook 05)
# ---------------------------------------------------------------------------

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
        kind, got = _call(layer, x)
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
