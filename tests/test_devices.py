"""Device choice under faked PyTorch versions and hardware, and the initial-loss check.

MPS (Apple GPU) gave losses of 19.9 where the CPU gives 3.8 on PyTorch versions
before 2.9, so choose_device uses it only from 2.9 on and says why otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

import helpers
from course.hardware import choose_device, torch_version_at_least
from course.settings import model_config
from course.training import check_initial_loss


@pytest.fixture
def fake_machine(monkeypatch):
    """Fake the PyTorch version and which GPUs are available."""

    def make(version: str, cuda: bool = False, mps: bool = False) -> None:
        monkeypatch.setattr(torch, "__version__", version)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return make


@pytest.mark.parametrize(
    "version, expected",
    [
        ("2.8.0", "cpu"),
        ("2.8.1+cpu", "cpu"),
        ("2.4.0", "cpu"),
        ("2.9.0", "mps"),
        ("2.9.0a0+git1234abc", "mps"),
        ("2.10.0", "mps"),  # 10 > 9 as numbers, not as text
        ("2.13.0+cpu", "mps"),
        ("3.0.0", "mps"),
    ],
)
def test_mps_only_from_pytorch_2_9(fake_machine, capsys, version, expected):
    fake_machine(version, mps=True)
    assert choose_device() == torch.device(expected)
    assert choose_device("mps") == torch.device(expected)
    out = capsys.readouterr().out
    if expected == "cpu":
        # it says why, twice (once per call), naming the version and the fix
        assert out.count(f"PyTorch {version} computes this chapter's losses wrongly") == 2
        assert "torch>=2.9" in out and "using the CPU" in out
    else:
        assert out == ""


def test_cuda_comes_first(fake_machine, capsys):
    fake_machine("2.8.0", cuda=True, mps=True)
    assert choose_device() == torch.device("cuda")
    assert choose_device("cuda") == torch.device("cuda")
    assert capsys.readouterr().out == ""


def test_cpu_when_nothing_else(fake_machine, capsys):
    fake_machine("2.13.0")
    assert choose_device() == torch.device("cpu")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("prefer", ["cuda", "mps"])
def test_asking_for_a_missing_device_falls_back_with_a_message(fake_machine, capsys, prefer):
    fake_machine("2.13.0")
    assert choose_device(prefer) == torch.device("cpu")
    assert f"{prefer} was asked for but is not available: using the CPU." in capsys.readouterr().out


def test_cuda_asked_for_on_a_mac_is_not_mps(fake_machine, capsys):
    fake_machine("2.13.0", mps=True)
    assert choose_device("cuda") == torch.device("cpu")
    assert "cuda was asked for" in capsys.readouterr().out


def test_cpu_can_be_forced(fake_machine):
    fake_machine("2.13.0", cuda=True, mps=True)
    assert choose_device("cpu") == torch.device("cpu")


def test_unknown_device_name(fake_machine):
    fake_machine("2.13.0")
    with pytest.raises(ValueError, match='"auto", "cuda", "mps" or "cpu"'):
        choose_device("gpu")


@pytest.mark.parametrize(
    "version, minimum, expected",
    [
        ("2.9.0", (2, 9), True),
        ("2.8.9", (2, 9), False),
        ("2.10.0", (2, 9), True),
        ("2.9", (2, 9), True),
        ("1.13.1", (2, 9), False),
        ("2.9.0.dev20250601+cpu", (2, 9), True),
        ("2.12.0+cu128", (2, 12), True),
        ("2.11.0+cu128", (2, 12), False),
    ],
)
def test_torch_version_at_least(version, minimum, expected):
    assert torch_version_at_least(version, minimum) is expected


# --- the initial-loss sanity check -----------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2-medium (355M)", "gpt2-medium", "355M"])
def test_initial_loss_like_the_books_passes(capsys, name):
    assert check_initial_loss(3.762, name) is True
    out = capsys.readouterr().out
    assert "3.762" in out and "as expected" in out and "WARNING" not in out


@pytest.mark.parametrize("loss", [19.9, 10.8, 2.9, float("nan"), float("inf")])
def test_initial_loss_far_from_the_books_warns(capsys, loss):
    assert check_initial_loss(loss, "gpt2-medium") is False
    out = capsys.readouterr().out
    assert out.startswith("WARNING")
    assert "3.762" in out  # the book's number
    assert "COURSE_DEVICE=cpu" in out and "load_weights_into_gpt" in out


def test_initial_loss_tolerance():
    assert check_initial_loss(3.762 + 0.49, "gpt2-medium") is True
    assert check_initial_loss(3.762 - 0.49, "gpt2-medium") is True
    assert check_initial_loss(3.762 + 0.51, "gpt2-medium") is False
    assert check_initial_loss(3.9, "gpt2-medium", tolerance=0.1) is False


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-large", "gpt2-xl"])
def test_initial_loss_of_other_sizes_only_rules_out_nonsense(capsys, name):
    assert check_initial_loss(4.2, name) is True
    assert "WARNING" not in capsys.readouterr().out
    assert check_initial_loss(19.9, name) is False
    assert "random guessing gives 10.8" in capsys.readouterr().out


def test_initial_loss_of_the_offline_model_says_it_means_nothing(capsys):
    assert check_initial_loss(10.83, "offline") is True
    out = capsys.readouterr().out
    assert "random weights" in out and "says nothing" in out and "WARNING" not in out


def test_a_model_without_its_weights_is_caught():
    """A GPTModel whose pretrained weights were never loaded: the loss of guessing."""
    torch.manual_seed(123)
    model = helpers.GPTModel(model_config("offline"))
    model.eval()
    tokens = torch.randint(0, 50257, (2, 17))
    with torch.no_grad():
        loss = helpers.calc_loss_batch(tokens[:, :-1], tokens[:, 1:], model, "cpu").item()
    assert abs(loss - math.log(50257)) < 1.0, loss  # about 10.8: no better than guessing
    assert check_initial_loss(loss, "offline") is True
    assert check_initial_loss(loss, "gpt2-medium") is False
    assert check_initial_loss(loss, "gpt2-small") is False
