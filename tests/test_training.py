"""course.training (the resumable trainer), precision choice, memory estimates, .pth files.

The model is an even smaller GPTModel than the offline model (random weights), with
dropout switched on, so that a resumed run only matches when every random number
generator is restored; the data are the first 30 entries of the shipped dataset.
A resumed run must end exactly where an uninterrupted one does, whether it was
stopped inside an epoch or killed after an end-of-epoch checkpoint (a real process,
killed with SIGKILL); a loss that is not finite stops training with nothing saved
as finished. Its messages speak to a notebook, or to the command line with its flags.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import helpers
from course import hardware, speed, training, weights
from course.settings import MODEL_NAMES, model_config

HERE = Path(__file__).resolve().parent.parent
EPOCHS, EVAL_FREQ, EVAL_ITER = 2, 2, 1


@pytest.fixture(scope="module")
def tokenizer():
    return helpers.get_tokenizer()


@pytest.fixture(scope="module")
def entries():
    data = json.loads((HERE / "instruction-data.json").read_text(encoding="utf-8"))
    return data[:30]


def config(**changes):
    tiny = {"emb_dim": 16, "n_layers": 2, "n_heads": 2, "context_length": 256, "drop_rate": 0.1}
    return {**model_config("offline"), **tiny, **changes}


def setup_run(entries, tokenizer, seed=123, lr=1e-3, loader_generator=False, drop_rate=0.1):
    """A fresh model, optimizer and loaders, as a new kernel would build them."""
    torch.manual_seed(seed)
    model = helpers.GPTModel(config(drop_rate=drop_rate))
    collate = partial(helpers.custom_collate_fn, device="cpu", allowed_max_length=1024)
    generator = torch.Generator().manual_seed(seed) if loader_generator else None
    train_loader = DataLoader(
        helpers.InstructionDataset(entries[:24], tokenizer),
        batch_size=4,
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    val_loader = DataLoader(
        helpers.InstructionDataset(entries[24:], tokenizer), batch_size=4, collate_fn=collate
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    return model, train_loader, val_loader, optimizer


def run(
    entries,
    tokenizer,
    seed=123,
    lr=1e-3,
    loader_generator=False,
    drop_rate=0.1,
    num_epochs_override=None,
    **kwargs,
):
    model, train_loader, val_loader, optimizer = setup_run(
        entries, tokenizer, seed, lr, loader_generator, drop_rate
    )
    history = training.train_model(
        model,
        train_loader,
        val_loader,
        optimizer,
        "cpu",
        num_epochs=num_epochs_override or EPOCHS,
        eval_freq=EVAL_FREQ,
        eval_iter=EVAL_ITER,
        start_context=helpers.format_input(entries[-1]),
        tokenizer=tokenizer,
        show_progress=False,
        checkpoint_minutes=None,
        **kwargs,
    )
    return history, model


def assert_same_run(history, reference, model=None, reference_model=None):
    """Exactly the same run: the same losses, tokens seen, samples and weights."""
    assert history["finished"] and reference["finished"]
    for key in ("train_losses", "val_losses"):
        assert len(history[key]) == len(reference[key]) > 0
        assert history[key] == reference[key], key
    assert history["tokens_seen"] == reference["tokens_seen"]
    assert history["eval_steps"] == reference["eval_steps"]
    assert history["samples"][-1] == reference["samples"][-1]
    if model is not None:
        for (name, p), (_, q) in zip(
            model.state_dict().items(), reference_model.state_dict().items(), strict=True
        ):
            assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def uninterrupted(entries, tokenizer):
    return run(entries, tokenizer)


def test_train_model_gives_the_losses_of_the_books_loop(entries, tokenizer, capsys):
    """With the book's settings (no dropout, fp32), the resumable loop on the fast paths
    and the book's train_model_simple give the same losses, tokens and printed lines.
    (With dropout both are right but draw their random masks differently.)"""
    history, _ = run(entries, tokenizer, drop_rate=0.0)
    resumable_out = capsys.readouterr().out
    model, train_loader, val_loader, optimizer = setup_run(entries, tokenizer, drop_rate=0.0)
    train_losses, val_losses, tokens_seen = helpers.train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        "cpu",
        EPOCHS,
        EVAL_FREQ,
        EVAL_ITER,
        helpers.format_input(entries[-1]),
        tokenizer,
    )
    book_out = capsys.readouterr().out
    assert history["train_losses"] == pytest.approx(train_losses, abs=1e-5, rel=0)
    assert history["val_losses"] == pytest.approx(val_losses, abs=1e-5, rel=0)
    assert history["tokens_seen"] == tokens_seen
    # the same lines: "Ep 1 (Step 000000): Train loss ..., Val loss ..." and the samples
    assert [line for line in resumable_out.splitlines() if line.startswith("Ep ")] == [
        line for line in book_out.splitlines() if line.startswith("Ep ")
    ]
    assert history["samples"][-1].replace("\n", " ") in book_out
    assert history["eval_steps"] == [0, 2, 4, 6, 8, 10]
    assert history["global_step"] == EPOCHS * len(train_loader) - 1 == 11
    # training did something: the loss went down
    assert train_losses[-1] < train_losses[0] - 0.1


@pytest.mark.parametrize(
    "stop_after",
    [4, 6, 9],  # inside epoch 1, at the end of epoch 1 (before its sample), inside epoch 2
)
def test_stopped_run_resumes_with_the_same_losses(
    entries, tokenizer, uninterrupted, tmp_path, stop_after
):
    reference, reference_model = uninterrupted
    checkpoint = tmp_path / "run-checkpoint.pth"
    first, _ = run(entries, tokenizer, checkpoint_path=checkpoint, max_steps=stop_after)
    assert not first["finished"] and first["global_step"] == stop_after - 1
    assert checkpoint.exists()
    # a new "kernel": other seeds everywhere, so only the checkpoint can restore them
    torch.manual_seed(999)
    history, model = run(entries, tokenizer, seed=7, checkpoint_path=checkpoint)
    assert_same_run(history, reference, model, reference_model)


def test_interrupted_run_continues_from_the_last_checkpoint(
    entries, tokenizer, uninterrupted, tmp_path, capsys
):
    """A KeyboardInterrupt in the middle of an optimizer step, as when a kernel stops."""
    reference, reference_model = uninterrupted
    checkpoint = tmp_path / "run-checkpoint.pth"
    model, train_loader, val_loader, optimizer = setup_run(entries, tokenizer)
    real_step, calls = optimizer.step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    optimizer.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        training.train_model(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            EPOCHS,
            EVAL_FREQ,
            EVAL_ITER,
            helpers.format_input(entries[-1]),
            tokenizer,
            checkpoint_path=checkpoint,
            checkpoint_every=4,
            checkpoint_minutes=None,
            show_progress=False,
        )
    assert "run the cell again to continue" in capsys.readouterr().out
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["progress"]["global_step"] == 7  # the checkpoint after 8 steps
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["batches_done"] == 2

    history, model = run(entries, tokenizer, seed=5, checkpoint_path=checkpoint)
    assert "Continuing from run-checkpoint.pth" in capsys.readouterr().out
    assert_same_run(history, reference, model, reference_model)


def interrupt_at_step(optimizer, step_number):
    """Make `optimizer.step` raise KeyboardInterrupt at its `step_number`-th call, as
    when a kernel is interrupted in the middle of a training step."""
    real_step, calls = optimizer.step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step_number:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    optimizer.step = interrupted_step


@pytest.mark.parametrize("epochs", [2, 3])
def test_resume_from_an_end_of_epoch_checkpoint_equals_the_uninterrupted_run(
    entries, tokenizer, tmp_path, capsys, epochs
):
    """Interrupted in the first step of epoch 2, with no checkpoint but the one written
    at the end of epoch 1: the next epoch's shuffle must come out as it would have."""
    reference, reference_model = run(entries, tokenizer, num_epochs_override=epochs)
    checkpoint = tmp_path / "run-checkpoint.pth"
    model, train_loader, val_loader, optimizer = setup_run(entries, tokenizer)
    steps_per_epoch = len(train_loader)
    interrupt_at_step(optimizer, steps_per_epoch + 1)
    with pytest.raises(KeyboardInterrupt):
        training.train_model(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            epochs,
            EVAL_FREQ,
            EVAL_ITER,
            helpers.format_input(entries[-1]),
            tokenizer,
            checkpoint_path=checkpoint,
            checkpoint_every=None,
            checkpoint_minutes=None,
            show_progress=False,
        )
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["batches_done"] == 0
    assert saved["epoch_rng"] is None  # written between epochs, not inside one
    capsys.readouterr()
    torch.manual_seed(999)  # a new kernel: other random states everywhere
    history, model = run(
        entries, tokenizer, seed=5, checkpoint_path=checkpoint, num_epochs_override=epochs
    )
    assert f"epoch 2, {steps_per_epoch} of {epochs * steps_per_epoch} steps done" in (
        capsys.readouterr().out
    )
    assert_same_run(history, reference, model, reference_model)


def test_resume_in_the_middle_of_an_epoch_equals_the_uninterrupted_run(
    entries, tokenizer, uninterrupted, tmp_path
):
    """Interrupted in epoch 2 after a checkpoint written inside it (every 3 steps)."""
    reference, reference_model = uninterrupted
    checkpoint = tmp_path / "run-checkpoint.pth"
    model, train_loader, val_loader, optimizer = setup_run(entries, tokenizer)
    interrupt_at_step(optimizer, 11)
    with pytest.raises(KeyboardInterrupt):
        training.train_model(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            EPOCHS,
            EVAL_FREQ,
            EVAL_ITER,
            helpers.format_input(entries[-1]),
            tokenizer,
            checkpoint_path=checkpoint,
            checkpoint_every=3,
            checkpoint_minutes=None,
            show_progress=False,
        )
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["batches_done"] == 3
    assert saved["epoch_rng"] is not None
    torch.manual_seed(999)
    history, model = run(entries, tokenizer, seed=5, checkpoint_path=checkpoint)
    assert_same_run(history, reference, model, reference_model)


# A training run in a process of its own, as notebook 05 runs in a kernel: killed with
# SIGKILL right after its end-of-epoch checkpoint appears, then run again.
CHILD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from functools import partial
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader

    import helpers
    from course import training
    from course.data import DATA_FILE
    from course.settings import model_config

    checkpoint, output, slow = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "slow"
    entries = json.loads(DATA_FILE.read_text(encoding="utf-8"))[:30]
    tokenizer = helpers.get_tokenizer()
    torch.manual_seed(123)
    tiny = {"emb_dim": 16, "n_layers": 2, "n_heads": 2, "context_length": 256, "drop_rate": 0.1}
    model = helpers.GPTModel({**model_config("offline"), **tiny})

    def collate(batch):
        if slow and checkpoint.exists():  # after the first checkpoint: time to be killed
            time.sleep(0.2)
        return helpers.custom_collate_fn(batch, allowed_max_length=1024)

    train_loader = DataLoader(
        helpers.InstructionDataset(entries[:24], tokenizer),
        batch_size=4, collate_fn=collate, shuffle=True, drop_last=True,
    )
    val_loader = DataLoader(
        helpers.InstructionDataset(entries[24:], tokenizer), batch_size=4, collate_fn=collate
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    history = training.train_model(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=3, eval_freq=2,
        eval_iter=1, start_context=helpers.format_input(entries[-1]), tokenizer=tokenizer,
        checkpoint_path=checkpoint, checkpoint_minutes=None, show_progress=False,
    )
    output.write_text(json.dumps(history))
    """
)


def run_child(script, checkpoint, output, slow=False):
    """Start the training script in a new Python process (the course folder on its path)."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return subprocess.Popen(
        [sys.executable, str(script), str(checkpoint), str(output), "slow" if slow else "-"],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_process_killed_after_the_end_of_epoch_checkpoint_resumes_exactly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(CHILD_SCRIPT)
    # the uninterrupted run, in a process of its own like the others
    reference_out = tmp_path / "reference.json"
    child = run_child(script, tmp_path / "reference-checkpoint.pth", reference_out)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out
    reference = json.loads(reference_out.read_text())

    checkpoint, output = tmp_path / "run-checkpoint.pth", tmp_path / "run.json"
    child = run_child(script, checkpoint, output, slow=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():  # written at the end of epoch 1 (and no earlier)
        assert child.poll() is None, child.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint after two minutes"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not output.exists()  # it did not get to the end
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["batches_done"] == 0
    assert not saved["progress"]["finished"]

    child = run_child(script, checkpoint, output)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out
    assert "Continuing from run-checkpoint.pth: epoch 2, 6 of 18 steps done." in out
    assert_same_run(json.loads(output.read_text()), reference)


def test_a_diverging_run_stops_at_the_first_non_finite_loss(
    entries, tokenizer, tmp_path, monkeypatch
):
    checkpoint = tmp_path / "run-checkpoint.pth"
    losses = []
    real_loss = training.calc_loss_batch_fast

    def recording_loss(*args):
        loss = real_loss(*args)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(training, "calc_loss_batch_fast", recording_loss)
    with pytest.raises(FloatingPointError, match=r"learning rate of 1000000000\.0.*COURSE_LR"):
        run(entries, tokenizer, lr=1e9, checkpoint_path=checkpoint, checkpoint_every=1)
    # it stopped at the first loss that is not a number, not later
    assert not math.isfinite(losses[-1]) and all(math.isfinite(x) for x in losses[:-1])
    if checkpoint.exists():
        assert not torch.load(checkpoint, weights_only=True)["progress"]["finished"]


def test_an_infinite_loss_stops_training_before_the_update(
    entries, tokenizer, tmp_path, monkeypatch
):
    checkpoint = tmp_path / "run-checkpoint.pth"
    real_loss, calls = training.calc_loss_batch_fast, []

    def loss_with_inf(input_batch, target_batch, model, device):
        calls.append(1)
        loss = real_loss(input_batch, target_batch, model, device)
        return loss * float("inf") if len(calls) == 8 else loss  # the 8th training batch

    monkeypatch.setattr(training, "calc_loss_batch_fast", loss_with_inf)
    monkeypatch.setattr(training, "evaluate_model_fast", lambda *a: (1.0, 1.0))
    model, train_loader, val_loader, optimizer = setup_run(entries, tokenizer)
    steps = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    with pytest.raises(FloatingPointError, match="training loss is inf at step 7"):
        training.train_model(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            EPOCHS,
            EVAL_FREQ,
            EVAL_ITER,
            helpers.format_input(entries[-1]),
            tokenizer,
            checkpoint_path=checkpoint,
            checkpoint_minutes=None,
            show_progress=False,
        )
    assert len(steps) == 7  # the bad step updated nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.load(checkpoint, weights_only=True)  # the end of epoch 1 only
    assert not saved["progress"]["finished"] and saved["progress"]["global_step"] == 5


def test_resume_restores_a_loaders_own_generator(entries, tokenizer, tmp_path):
    reference, reference_model = run(entries, tokenizer, loader_generator=True)
    checkpoint = tmp_path / "run-checkpoint.pth"
    run(entries, tokenizer, loader_generator=True, checkpoint_path=checkpoint, max_steps=6)
    history, model = run(
        entries, tokenizer, seed=3, loader_generator=True, checkpoint_path=checkpoint
    )
    assert_same_run(history, reference, model, reference_model)


def test_bf16_run_resumes_with_the_same_losses(entries, tokenizer, uninterrupted, tmp_path):
    reference, reference_model = run(entries, tokenizer, precision="bf16")
    checkpoint = tmp_path / "run-checkpoint.pth"
    run(entries, tokenizer, precision="bf16", checkpoint_path=checkpoint, max_steps=7)
    history, model = run(entries, tokenizer, precision="bf16", checkpoint_path=checkpoint)
    assert_same_run(history, reference, model, reference_model)
    # bf16 computes the same function, less precisely
    fp32, _ = uninterrupted
    assert history["train_losses"] == pytest.approx(fp32["train_losses"], abs=0.1)


def test_a_finished_run_is_not_repeated_unless_forced(entries, tokenizer, tmp_path, capsys):
    checkpoint = tmp_path / "run-checkpoint.pth"
    first, trained = run(entries, tokenizer, checkpoint_path=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["progress"]["finished"] and saved["optimizer_state_dict"] is None

    model, train_loader, val_loader, optimizer = setup_run(entries, tokenizer, seed=11)
    steps = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    args = (model, train_loader, val_loader, optimizer, "cpu", EPOCHS, EVAL_FREQ, EVAL_ITER)
    again = training.train_model(
        *args,
        helpers.format_input(entries[-1]),
        tokenizer,
        checkpoint_path=checkpoint,
        show_progress=False,
    )
    assert steps == []
    assert "already finished" in capsys.readouterr().out
    assert again["train_losses"] == first["train_losses"]
    for (name, p), (_, q) in zip(
        model.state_dict().items(), trained.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name

    training.train_model(
        *args,
        helpers.format_input(entries[-1]),
        tokenizer,
        checkpoint_path=checkpoint,
        show_progress=False,
        force=True,
    )
    assert len(steps) == EPOCHS * len(train_loader)


def test_an_unfinished_run_with_other_settings_is_not_continued(entries, tokenizer, tmp_path):
    checkpoint = tmp_path / "run-checkpoint.pth"
    run(entries, tokenizer, checkpoint_path=checkpoint, max_steps=4, run_config={"style": "a"})
    with pytest.raises(ValueError, match=r"run-checkpoint\.pth.*lr 0\.001 then, 0\.002 now"):
        run(entries, tokenizer, lr=2e-3, checkpoint_path=checkpoint, run_config={"style": "a"})
    with pytest.raises(ValueError, match=r"style 'a' then, 'b' now.*Delete it"):
        run(entries, tokenizer, checkpoint_path=checkpoint, run_config={"style": "b"})


def test_a_finished_run_with_other_settings_is_replaced(entries, tokenizer, tmp_path, capsys):
    checkpoint = tmp_path / "run-checkpoint.pth"
    run(entries, tokenizer, checkpoint_path=checkpoint, run_config={"style": "a"})
    history, _ = run(entries, tokenizer, checkpoint_path=checkpoint, run_config={"style": "b"})
    out = capsys.readouterr().out
    assert "finished run with other settings (style 'a' then, 'b' now)" in out
    assert "Training from the start" in out
    assert history["finished"]
    assert torch.load(checkpoint, weights_only=True)["settings"]["style"] == "b"


def test_a_damaged_checkpoint_names_the_file_and_the_fix(entries, tokenizer, tmp_path):
    checkpoint = tmp_path / "run-checkpoint.pth"
    run(entries, tokenizer, checkpoint_path=checkpoint, max_steps=2)
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # a cut-off copy
    with pytest.raises(RuntimeError, match=r"run-checkpoint\.pth could not be read.*Delete it"):
        run(entries, tokenizer, checkpoint_path=checkpoint)
    torch.save({"something": "else"}, checkpoint)
    with pytest.raises(ValueError, match="not a training checkpoint of this course"):
        run(entries, tokenizer, checkpoint_path=checkpoint)


def test_load_model_weights_reads_the_books_files(tmp_path):
    torch.manual_seed(1)
    saved = helpers.GPTModel(config())
    path = tmp_path / "book-sft.pth"
    torch.save(saved.state_dict(), path)  # the book's way, mask buffers included
    assert any(key.endswith(".att.mask") for key in torch.load(path, weights_only=True))
    model = weights.load_model_weights(helpers.GPTModel(config()), path)
    for (name, p), (_, q) in zip(
        model.state_dict().items(), saved.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    # without the constant mask buffers, and with torch.compile's prefix
    state = {f"_orig_mod.{k}": v for k, v in saved.state_dict().items() if not k.endswith(".mask")}
    torch.save(state, path)
    model = weights.load_model_weights(helpers.GPTModel(config()), path)
    assert torch.equal(model.tok_emb.weight, saved.tok_emb.weight)


def test_load_model_weights_names_the_tensors_that_do_not_fit(tmp_path):
    path = tmp_path / "offlinetiny-sft.pth"
    torch.save(helpers.GPTModel(config()).state_dict(), path)
    wider = helpers.GPTModel(config(emb_dim=128))
    with pytest.raises(ValueError) as error:
        weights.load_model_weights(wider, path)
    message = str(error.value)
    assert "offlinetiny-sft.pth do not fit this model (37 tensors)" in message
    assert "tok_emb.weight: the file has (50257, 16), the model (50257, 128)" in message
    assert "... and 27 more" in message
    assert "COURSE_MODEL" in message
    deeper = helpers.GPTModel(config(n_layers=3))
    with pytest.raises(ValueError, match="trf_blocks.2.att.W_query.weight: missing in the file"):
        weights.load_model_weights(deeper, path)
    shallower = helpers.GPTModel(config(n_layers=1))
    with pytest.raises(
        ValueError, match="trf_blocks.1.att.W_query.weight: in the file, not in the model"
    ):
        weights.load_model_weights(shallower, path)


def test_load_model_weights_names_missing_and_damaged_files(tmp_path):
    model = helpers.GPTModel(config())
    with pytest.raises(FileNotFoundError, match="05_instruction_finetuning"):
        weights.load_model_weights(model, tmp_path / "gpt2-medium355M-sft.pth")
    damaged = tmp_path / "gpt2-medium355M-sft.pth"
    damaged.write_bytes(b"not a pytorch file")
    with pytest.raises(RuntimeError, match=r"gpt2-medium355M-sft\.pth could not be read.*Delete"):
        weights.load_model_weights(model, damaged)
    torch.save([1, 2, 3], damaged)
    with pytest.raises(ValueError, match="holds no model weights"):
        weights.load_model_weights(model, damaged)


def test_choose_precision_on_the_cpu(capsys):
    assert speed.choose_precision("cpu") == "fp32"
    assert "fp32 (the default on the cpu" in capsys.readouterr().out
    assert speed.choose_precision("cpu", "bf16") == "bf16"
    assert speed.choose_precision(torch.device("cpu"), "fp32") == "fp32"
    with pytest.raises(ValueError, match="fp16 training needs a CUDA GPU"):
        speed.choose_precision("cpu", "fp16")
    with pytest.raises(ValueError, match="use one of auto, fp32, bf16, fp16"):
        speed.choose_precision("cpu", "float16")


@pytest.mark.parametrize(
    "gpu, capability, requested, expected, reason",
    [
        ("NVIDIA A100-SXM4-40GB", (8, 0), "auto", "bf16", "supports bfloat16"),
        ("NVIDIA L4", (8, 9), "bf16", "bf16", "as asked"),
        ("Tesla T4", (7, 5), "auto", "fp32", "Tesla T4 has no bfloat16 support"),
        ("Tesla T4", (7, 5), "bf16", "fp32", "COURSE_PRECISION=fp16"),
        ("Tesla T4", (7, 5), "fp16", "fp16", "gradient scaler"),
        ("NVIDIA A100-SXM4-40GB", (8, 0), "fp32", "fp32", "as asked"),
    ],
)
def test_choose_precision_on_gpus(
    monkeypatch, capsys, gpu, capability, requested, expected, reason
):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert speed.choose_precision("cuda", requested) == expected
    assert reason in capsys.readouterr().out


def test_autocast_context_computes_in_bf16_only_when_asked():
    x = torch.randn(4, 4)
    with speed.autocast_context("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with speed.autocast_context("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError):
        speed.autocast_context("cpu", "auto")


def test_count_parameters_matches_the_model():
    for cfg in (config(), config(qkv_bias=False, emb_dim=96, n_heads=3, n_layers=3)):
        model = helpers.GPTModel(cfg)
        assert hardware.count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    # the book (chapter 4): GPT-2 small without query-key-value bias, output head untied
    small = {**model_config("gpt2-small"), "qkv_bias": False}
    assert hardware.count_parameters(small) == 163_009_536


def test_memory_estimates_grow_with_the_model():
    needs = [hardware.memory_needed(model_config(n)) for n in MODEL_NAMES]
    sizes = [need["training"] for need in needs[:4]]
    assert sizes == sorted(sizes)
    for need in needs:
        assert need["weights"] == 4 * need["parameters"]
        assert need["training"] > 4 * need["weights"]


@pytest.mark.parametrize(
    "free_gb, suggestion",
    [(64, None), (6, "gpt2-small (124M)"), (1, "offline (tiny)")],
)
def test_check_memory_suggests_a_model_that_fits(monkeypatch, capsys, free_gb, suggestion):
    monkeypatch.setattr(
        hardware,
        "memory_available",
        lambda device: {"where": "memory (RAM)", "total": 64 * 1024**3, "free": free_gb * 1024**3},
    )
    assert hardware.check_memory("gpt2-medium", "cpu") == suggestion
    out = capsys.readouterr().out
    assert "gpt2-medium (355M): about 1.5 GB to generate" in out
    if suggestion is None:
        assert "Fine-tuning fits." in out
    else:
        assert f'COURSE_MODEL="{suggestion.split(" ")[0]}"' in out


# -- the words of the messages: a notebook's cells, or the command's own flags --------------


def test_a_refused_checkpoint_speaks_to_the_notebook_or_the_command_line(
    entries, tokenizer, tmp_path
):
    checkpoint = tmp_path / "run-checkpoint.pth"
    run(entries, tokenizer, checkpoint_path=checkpoint, max_steps=1, run_config={"batch_size": 8})
    again = dict(checkpoint_path=checkpoint, run_config={"batch_size": 4})
    with pytest.raises(ValueError) as notebook:
        run(entries, tokenizer, **again)
    with pytest.raises(ValueError) as command_line:
        run(entries, tokenizer, interface="command line", **again)
    said = str(notebook.value)
    assert "batch_size 8 then, 4 now" in said and "the training cell then starts" in said
    assert "COURSE_RETRAIN=1 (force=True)" in said and "(COURSE_BATCH_SIZE=8)" in said
    assert "run the cell again to continue it" in said and "--" not in said
    said = str(command_line.value)
    assert "batch_size 8 then, 4 now" in said and "the same command then starts" in said
    assert "add --retrain" in said and "(--batch-size 8)" in said
    assert "run the same command again to continue it" in said
    assert "cell" not in said and "force=True" not in said and "COURSE_" not in said

    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # a cut-off copy
    with pytest.raises(RuntimeError, match=r"could not be read.*add --retrain") as damaged:
        run(entries, tokenizer, interface="command line", **again)
    assert "notebook" not in str(damaged.value)
    with pytest.raises(ValueError, match="interface='shell': use 'notebook' or 'command line'"):
        run(entries, tokenizer, interface="shell")


def test_ctrl_c_on_the_command_line_says_to_run_the_same_command_again(
    entries, tokenizer, tmp_path, capsys
):
    checkpoint = tmp_path / "run-checkpoint.pth"
    model, train_loader, val_loader, optimizer = setup_run(entries, tokenizer)
    interrupt_at_step(optimizer, 3)
    with pytest.raises(KeyboardInterrupt):
        training.train_model(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            EPOCHS,
            EVAL_FREQ,
            EVAL_ITER,
            helpers.format_input(entries[-1]),
            tokenizer,
            checkpoint_path=checkpoint,
            checkpoint_every=1,
            checkpoint_minutes=None,
            show_progress=False,
            interface="command line",
        )
    out = capsys.readouterr().out
    assert "Interrupted. The last checkpoint is in run-checkpoint.pth" in out
    assert "run the same command again to continue from there" in out and "cell" not in out
    history, _ = run(entries, tokenizer, checkpoint_path=checkpoint, interface="command line")
    assert history["finished"]
    run(entries, tokenizer, checkpoint_path=checkpoint, interface="command line")
    out = capsys.readouterr().out
    assert "already finished" in out and "Add --retrain to train again." in out
