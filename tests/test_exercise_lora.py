"""The check of exercise 7.4 (notebook 05) can fail.

The solution and the scaffold are taken from the notebook: the code block of the folded
solution and the scaffold cell. The check must accept the solution (the printed book's
appendix E code), say "not attempted yet" for the scaffold, and reject each wrong
version with its own hint, without ever raising.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn as nn

import course.exercises as exercises
import helpers

ROOT = Path(__file__).resolve().parent.parent
NB05 = ROOT / "05_instruction_finetuning.ipynb"


def notebook_cells() -> tuple[str, str]:
    """(the scaffold cell's code, the folded solution's code) of exercise 7.4."""
    cells = nbformat.read(NB05, as_version=4).cells
    scaffolds = [
        c.source
        for c in cells
        if c.cell_type == "code"
        and "class LinearWithLoRA(" in c.source
        and "# your code here" in c.source
    ]
    solutions = [
        block
        for c in cells
        if c.cell_type == "markdown" and "<summary>Solution</summary>" in c.source
        for block in re.findall(r"```python\n(.*?)```", c.source, re.S)
        if "class LinearWithLoRA(" in block
    ]
    assert len(scaffolds) == 1, "expected one scaffold cell for exercise 7.4"
    assert len(solutions) == 1, "expected one folded solution for exercise 7.4"
    return scaffolds[0], solutions[0]


def define(source: str) -> dict:
    """Run a notebook cell's code in a fresh namespace; its names."""
    namespace: dict = {}
    exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def solution():
    names = define(notebook_cells()[1])
    return names["LinearWithLoRA"], names["replace_linear_with_lora"]


def test_the_notebooks_solution_is_right(solution):
    result = exercises.check_lora(*solution)
    assert result.status == "right", result.message
    assert "7,898,384" in result.message
    assert "out_head included" in result.message


def test_the_notebooks_scaffold_is_not_attempted():
    names = define(notebook_cells()[0])
    result = exercises.check_lora(names["LinearWithLoRA"], names["replace_linear_with_lora"])
    assert result.status == "not attempted"
    assert str(result).startswith("Exercise 7.4: not attempted yet")


def test_the_check_leaves_the_random_generator_alone(solution):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    exercises.check_lora(*solution)
    assert torch.equal(torch.rand(3), expected)


# -- wrong versions, each with its own message ------------------------------------------


def replacing_with(LinearWithLoRA):
    """The solution's replace_linear_with_lora, wrapping with `LinearWithLoRA`."""

    def replace_linear_with_lora(model, rank, alpha):
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                setattr(model, name, LinearWithLoRA(module, rank, alpha))
            else:
                replace_linear_with_lora(module, rank, alpha)

    return replace_linear_with_lora


def wrong_forward(body):
    """The solution with another LinearWithLoRA.forward."""

    def make(solution):
        cls = type("LinearWithLoRA", (solution[0],), {"forward": body})
        return cls, replacing_with(cls)

    return make


def forgot_alpha(self, x):
    return self.linear(x) + x @ self.lora.A @ self.lora.B


def only_the_update(self, x):
    return self.lora(x)


def only_the_linear(self, x):
    return self.linear(x)


def random_b(solution):
    base = solution[0]

    class LinearWithLoRA(base):
        def __init__(self, linear, rank, alpha):
            super().__init__(linear, rank, alpha)
            nn.init.normal_(self.lora.B)  # not a no-op at the start

    return LinearWithLoRA, replacing_with(LinearWithLoRA)


def no_recursion(solution):
    LinearWithLoRA = solution[0]

    def replace_linear_with_lora(model, rank, alpha):
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                setattr(model, name, LinearWithLoRA(module, rank, alpha))

    return LinearWithLoRA, replace_linear_with_lora


def misses_out_head(solution):
    LinearWithLoRA = solution[0]

    def replace_linear_with_lora(model, rank, alpha):
        for name, module in model.named_children():
            if name == "out_head":
                continue
            if isinstance(module, nn.Linear):
                setattr(model, name, LinearWithLoRA(module, rank, alpha))
            else:
                replace_linear_with_lora(module, rank, alpha)

    return LinearWithLoRA, replace_linear_with_lora


def fixed_rank(solution):
    LinearWithLoRA = solution[0]

    def replace_linear_with_lora(model, rank, alpha):
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                setattr(model, name, LinearWithLoRA(module, 16, alpha))
            else:
                replace_linear_with_lora(module, rank, alpha)

    return LinearWithLoRA, replace_linear_with_lora


def new_linear(solution):
    """Wraps a fresh copy of each layer: it trains, and it is not the pretrained one."""
    LinearWithLoRA = solution[0]

    def replace_linear_with_lora(model, rank, alpha):
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                copy = nn.Linear(module.in_features, module.out_features, module.bias is not None)
                copy.load_state_dict(module.state_dict())
                setattr(model, name, LinearWithLoRA(copy, rank, alpha))
            else:
                replace_linear_with_lora(module, rank, alpha)

    return LinearWithLoRA, replace_linear_with_lora


def wrapped_twice(solution):
    """Wraps every layer, then wraps the wrapped layers' nn.Linear again."""
    LinearWithLoRA, replace_once = solution

    def replace_linear_with_lora(model, rank, alpha):
        replace_once(model, rank, alpha)
        for module in list(model.modules()):
            if isinstance(module, LinearWithLoRA) and isinstance(module.linear, nn.Linear):
                module.linear = LinearWithLoRA(module.linear, rank, alpha)

    return LinearWithLoRA, replace_linear_with_lora


def frozen_under_no_grad(self, x):
    with torch.no_grad():  # "the layer is frozen anyway"
        frozen = self.linear(x)
    return frozen + self.lora(x)


def adapter_gets_detached_x(self, x):
    return self.linear(x) + self.lora(x.detach())


def adapter_in_training_only(self, x):
    out = self.linear(x)
    if self.training:
        out = out + self.lora(x)
    return out


def scaled_by_alpha_over_rank(self, x):
    """The repository's later convention: alpha / rank."""
    rank = self.lora.A.shape[1]
    return self.linear(x) + self.lora.alpha / rank * (x @ self.lora.A @ self.lora.B)


def returns_float64(self, x):
    return (self.linear(x) + self.lora(x)).double()


def renamed_adapter(solution):
    """Keeps the adapter as self.adapter: the old check ended in an AttributeError."""
    base = solution[0]

    class LinearWithLoRA(base):
        def __init__(self, linear, rank, alpha):
            super().__init__(linear, rank, alpha)
            self.adapter = self.lora
            del self.lora

        def forward(self, x):
            return self.linear(x) + self.adapter(x)

    return LinearWithLoRA, replacing_with(LinearWithLoRA)


def raises_in_eval_mode(self, x):
    if not self.training:
        raise RuntimeError("not in eval mode")
    return self.linear(x) + self.lora(x)


def forward_not_written(solution):
    return wrong_forward(lambda self, x: None)(solution)


def raises(solution):
    def replace_linear_with_lora(model, rank, alpha):
        for name, module in model.named_modules():
            setattr(model, name, solution[0](module, rank, alpha))  # module may be no Linear

    return solution[0], replace_linear_with_lora


WRONG = {
    "forgot alpha": (wrong_forward(forgot_alpha), "after B was set", "not scaled by alpha"),
    "only the update": (wrong_forward(only_the_update), "at the start", "output is missing"),
    "only the linear layer": (
        wrong_forward(only_the_linear),
        "after B was set",
        "the adapter's part is missing",
    ),
    "B not zero at the start": (random_b, "at the start (B is zero)", "keep LoRALayer as given"),
    "no recursion": (no_recursion, "trf_blocks.0.att.W_query", "(recursion)"),
    "misses out_head": (misses_out_head, "the layer out_head", "out_head, the output layer"),
    "ignores rank": (fixed_rank, ".lora", "pass replace_linear_with_lora's rank and alpha"),
    "a new nn.Linear": (new_linear, ".linear", "a new or copied layer"),
    "wrapped twice": (wrapped_twice, ".linear", "wrapped twice"),
    "forward not written": (forward_not_written, "shape (2, 5, 4)", "returns nothing yet"),
    "raises": (raises, "replace_linear_with_lora(model", "raised an error"),
    "frozen layer under torch.no_grad()": (
        wrong_forward(frozen_under_no_grad),
        "layer 1's lora.",
        "under torch.no_grad()",
    ),
    "adapter gets x.detach()": (
        wrong_forward(adapter_gets_detached_x),
        "layer 1's lora.",
        "x.detach()",
    ),
    "adapter in training mode only": (
        wrong_forward(adapter_in_training_only),
        "in eval mode (layer.eval())",
        "in train mode only",
    ),
    "scaled by alpha / rank": (
        wrong_forward(scaled_by_alpha_over_rank),
        "after B was set",
        "the other convention",
    ),
    "returns float64": (
        wrong_forward(returns_float64),
        "shape (2, 5, 4)",
        "keep the input's dtype",
    ),
    "adapter renamed": (
        renamed_adapter,
        "LinearWithLoRA(nn.Linear(4, 3)",
        "keep __init__ as given",
    ),
    "raises in eval mode": (
        wrong_forward(raises_in_eval_mode),
        "in eval mode",
        "forward raised an error",
    ),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_version_is_rejected_with_its_own_hint(solution, name):
    make, where, hint = WRONG[name]
    result = exercises.check_lora(*make(solution))
    assert result.status == "wrong", (name, result.message)
    lines = dict(
        line.strip().split(":", 1) for line in result.message.splitlines()[1:] if ":" in line
    )
    assert where in lines["input"], (name, result.message)
    assert hint in lines["hint"], (name, result.message)


def test_each_wrong_version_gets_a_different_message(solution):
    messages = {
        name: exercises.check_lora(*make(solution)).message for name, (make, *_) in WRONG.items()
    }
    assert len(set(messages.values())) == len(messages)


def test_a_correct_count_is_still_checked_on_gpt2_medium(solution, monkeypatch):
    """The 7,898,384 comes from GPT-2 medium's own shapes: a different expected count fails."""
    monkeypatch.setattr(exercises.lora, "GPT2_MEDIUM_LORA_PARAMETERS", 7_898_385)
    result = exercises.check_lora(*solution)
    assert result.status == "wrong"
    assert "7,898,384" in result.message and "GPT-2 medium" in result.message


def test_the_other_convention_is_explained_both_ways(solution):
    """Scaling by alpha / rank is not called a mistake in the dark: the hint names both."""
    result = exercises.check_lora(*wrong_forward(scaled_by_alpha_over_rank)(solution))
    assert result.status == "wrong"
    assert "printed appendix E" in result.message and "alpha / rank" in result.message
    assert "later version" in result.message


def test_gradients_are_compared_with_the_course_through_stacked_layers(solution):
    """Both cut paths leave every value right: only the earlier layers' gradients differ."""
    for body in (frozen_under_no_grad, adapter_gets_detached_x):
        cls, _ = wrong_forward(body)(solution)
        torch.manual_seed(0)
        linear = nn.Linear(4, 4)
        yours = cls(linear, 2, 3.0)
        nn.init.normal_(yours.lora.B)
        course = helpers.LinearWithLoRA(linear, 2, 3.0)
        course.lora.load_state_dict(yours.lora.state_dict())
        x = torch.randn(2, 5, 4)
        for mode in (True, False):
            assert torch.allclose(yours.train(mode)(x), course.train(mode)(x))  # values right
        result = exercises.check_lora(cls, replacing_with(cls))
        assert "layer 1's lora." in result.message, result.message


def test_an_endless_loop_becomes_a_hint(solution, monkeypatch):
    import functools

    from course.exercises import lora, results

    quick = functools.partial(results.call, seconds=1)
    monkeypatch.setattr(lora, "call", quick)

    def replace_linear_with_lora(model, rank, alpha):
        while True:
            pass

    result = exercises.check_lora(solution[0], replace_linear_with_lora)
    assert result.status == "wrong"
    assert "TimeoutError" in result.message and "loop that never ends" in result.message
