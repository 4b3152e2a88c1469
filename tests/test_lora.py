"""Exercise 7.4, LoRA: the book's layers (helpers.py section 8) and course/lora.py.

LoRA starts as an exact no-op, only the adapters learn, merged weights give the
same logits as the adapters, the fast paths run LoRA models with the same results,
a LoRA run resumes exactly, and the notebook's LoRA steps run on the offline model.
"""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import helpers
from course import lora, settings, speed
from course.training import train_model
from course.weights import load_model_weights

ROOT = Path(__file__).resolve().parent.parent
RANK, ALPHA = 16, 16


def small_config(**changes):
    """The offline model's shape (64 dims, 2 blocks, the full vocabulary), shorter context."""
    return {**settings.model_config("offline"), "context_length": 256, **changes}


def fresh_model(seed=123, **changes):
    torch.manual_seed(seed)
    model = helpers.GPTModel(small_config(**changes))
    model.eval()
    return model


def randomize_adapters(model, seed=7):
    """Give every B a nonzero value, as training would (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, helpers.LoRALayer):
                module.B.copy_(torch.randn(module.B.shape, generator=generator) * 0.01)


@pytest.fixture(scope="module")
def entries():
    return json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))[:40]


@pytest.fixture(scope="module")
def batch(entries, tokenizer):
    dataset = helpers.InstructionDataset(entries[:8], tokenizer)
    return helpers.custom_collate_fn([dataset[i] for i in range(8)])


def test_lora_starts_as_an_exact_no_op(batch):
    inputs, _ = batch
    model = fresh_model()
    with torch.no_grad():
        before = model(inputs)
    lora.apply_lora(model, RANK, ALPHA)
    with torch.no_grad():
        after = model(inputs)
    assert torch.equal(before, after)
    # and the layers are really there: 4 + 2 per block, and the output layer
    replaced = [m for m in model.modules() if isinstance(m, helpers.LinearWithLoRA)]
    assert len(replaced) == 6 * 2 + 1
    assert not any(
        type(m) is torch.nn.Linear for m in model.modules() if m not in [r.linear for r in replaced]
    )


def test_lora_layer_shapes_and_formula():
    layer = helpers.LoRALayer(in_dim=5, out_dim=3, rank=2, alpha=4)
    assert layer.A.shape == (5, 2) and layer.B.shape == (2, 3)
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) > 0
    with torch.no_grad():
        layer.B.fill_(0.5)
    x = torch.randn(7, 5)
    assert torch.allclose(layer(x), 4 * x @ layer.A @ layer.B)


def test_parameter_counts_offline_and_the_official_gpt2_medium_figure():
    model = fresh_model()
    counts = lora.apply_lora(model, RANK, ALPHA)
    assert counts["before"]["trainable"] == counts["before"]["total"]
    assert counts["after"]["trainable"] == lora.lora_parameter_count(small_config(), RANK)
    assert counts["after"]["trainable"] == 842_000
    assert counts["after"]["total"] == counts["before"]["total"] + 842_000
    assert counts["layers"] == 13
    # the official solution of exercise 7.4: 7,898,384 trainable parameters in GPT-2 medium
    medium = settings.model_config("gpt2-medium (355M)")
    with torch.device("meta"):  # shapes only, no memory
        big = helpers.GPTModel(medium)
        big_counts = lora.apply_lora(big, RANK, ALPHA)
    assert big_counts["after"]["trainable"] == 7_898_384
    assert lora.lora_parameter_count(medium, RANK) == 7_898_384


def test_apply_lora_twice_is_refused():
    model = fresh_model()
    lora.apply_lora(model, RANK, ALPHA)
    with pytest.raises(ValueError, match="LoRA layers already"):
        lora.apply_lora(model, RANK, ALPHA)


def test_only_the_adapters_receive_gradients_and_change(batch):
    inputs, targets = batch
    model = fresh_model()
    lora.apply_lora(model, RANK, ALPHA)
    frozen_before = {
        name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad
    }
    optimizer = speed.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in optimized) == 842_000
    assert all(p.requires_grad for p in optimized)

    model.train()
    for _ in range(2):  # after the first step B is no longer zero, so A learns too
        optimizer.zero_grad()
        loss = speed.calc_loss_batch_fast(inputs, targets, model, "cpu")
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        is_adapter = ".lora." in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
        if is_adapter:
            assert torch.count_nonzero(p.grad) > 0, name
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    assert any(
        torch.count_nonzero(m.B) > 0 for m in model.modules() if isinstance(m, helpers.LoRALayer)
    )


def test_merged_weights_give_the_same_logits(batch):
    inputs, _ = batch
    model = fresh_model()
    lora.apply_lora(model, RANK, ALPHA)
    randomize_adapters(model)
    with torch.no_grad():
        lora_logits = model(inputs)
        plain_logits = fresh_model()(inputs)
    assert not torch.allclose(lora_logits, plain_logits, atol=1e-3)  # the adapters matter

    merged = lora.merged_state_dict(model)
    plain = fresh_model(seed=999)
    assert set(merged) == set(plain.state_dict())  # a plain GPTModel state_dict
    plain.load_state_dict(merged)
    with torch.no_grad():
        merged_logits = plain(inputs)
    assert torch.allclose(merged_logits, lora_logits, atol=1e-5, rtol=0)
    # merging in place gives the same again, and leaves plain nn.Linear layers
    lora.merge_lora(model)
    assert not any(isinstance(m, helpers.LinearWithLoRA) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(inputs), lora_logits, atol=1e-5, rtol=0)


def test_fast_paths_run_lora_models_with_the_same_results(batch, tokenizer, entries):
    inputs, targets = batch
    model = fresh_model()
    lora.apply_lora(model, RANK, ALPHA)
    randomize_adapters(model)
    with torch.no_grad():
        assert torch.allclose(speed.forward(model, inputs), model(inputs), atol=1e-5, rtol=0)
        fast = speed.calc_loss_batch_fast(inputs, targets, model, "cpu")
        plain = helpers.calc_loss_batch(inputs, targets, model, "cpu")
    assert fast.item() == pytest.approx(plain.item(), abs=1e-5)
    prompt = helpers.text_to_token_ids(helpers.format_input(entries[0]), tokenizer)
    book = helpers.generate(model, prompt, max_new_tokens=8, context_size=256)
    cached = speed.generate_fast(model, prompt, max_new_tokens=8, context_size=256)
    assert torch.equal(book, cached)


def loaders(entries, tokenizer):
    collate = partial(helpers.custom_collate_fn, device="cpu", allowed_max_length=256)
    train_loader = DataLoader(
        helpers.InstructionDataset(entries[:24], tokenizer),
        batch_size=8,
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
    )
    val_loader = DataLoader(
        helpers.InstructionDataset(entries[24:32], tokenizer), batch_size=8, collate_fn=collate
    )
    return train_loader, val_loader


def lora_run(entries, tokenizer, checkpoint_path=None, **kwargs):
    """What notebook 05 does with COURSE_FINETUNE=lora, on a small model and data."""
    model = fresh_model(drop_rate=0.1)  # dropout on: resuming must restore the generators
    torch.manual_seed(123)
    lora.apply_lora(model, RANK, ALPHA)
    train_loader, val_loader = loaders(entries, tokenizer)
    torch.manual_seed(123)
    optimizer = speed.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    history = train_model(
        model,
        train_loader,
        val_loader,
        optimizer,
        "cpu",
        num_epochs=2,
        eval_freq=2,
        eval_iter=1,
        start_context=helpers.format_input(entries[-1]),
        tokenizer=tokenizer,
        checkpoint_path=checkpoint_path,
        run_config={"finetune": "lora", "lora_rank": RANK, "lora_alpha": ALPHA},
        checkpoint_minutes=None,
        show_progress=False,
        **kwargs,
    )
    return history, model


@pytest.fixture(scope="module")
def uninterrupted(entries, tokenizer):
    return lora_run(entries, tokenizer)


@pytest.mark.parametrize("stop_after", [2, 3])  # inside epoch 1; at its end
def test_a_lora_run_resumes_exactly(entries, tokenizer, uninterrupted, tmp_path, stop_after):
    reference, reference_model = uninterrupted
    checkpoint = tmp_path / "lora-checkpoint.pth"
    first, _ = lora_run(entries, tokenizer, checkpoint, max_steps=stop_after)
    assert not first["finished"] and checkpoint.exists()
    saved = torch.load(checkpoint, weights_only=False)
    assert any(".lora.A" in key for key in saved["model_state_dict"])
    history, model = lora_run(entries, tokenizer, checkpoint)  # a new "kernel"
    assert history["finished"]
    assert history["train_losses"] == pytest.approx(reference["train_losses"], abs=1e-6, rel=0)
    assert history["val_losses"] == pytest.approx(reference["val_losses"], abs=1e-6, rel=0)
    assert history["tokens_seen"] == reference["tokens_seen"]
    for (name, p), (_, q) in zip(
        model.state_dict().items(), reference_model.state_dict().items(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name
    # and a finished LoRA run is reloaded, not repeated
    again, again_model = lora_run(entries, tokenizer, checkpoint)
    assert again["train_losses"] == history["train_losses"]
    assert torch.equal(again_model.out_head.lora.B, model.out_head.lora.B)


def test_notebook_05_lora_steps_run_and_save_a_plain_model(
    entries, tokenizer, uninterrupted, tmp_path
):
    history, model = uninterrupted
    assert history["finished"] and len(history["train_losses"]) == 3
    assert history["train_losses"][-1] < history["train_losses"][0]
    # what notebook 05 saves: merged weights, a plain GPTModel state_dict
    sft_path = tmp_path / "offlinetiny-lora-sft.pth"
    torch.save(lora.merged_state_dict(model), sft_path)
    reloaded = load_model_weights(fresh_model(seed=5, drop_rate=0.1), sft_path)
    inputs, _ = next(iter(loaders(entries, tokenizer)[1]))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(inputs), model(inputs), atol=1e-5, rtol=0)
    # notebook 07's cached generation gives the same answer from the saved file
    prompt = helpers.text_to_token_ids(helpers.format_input(entries[-1]), tokenizer)
    assert torch.equal(
        speed.generate_fast(reloaded, prompt, max_new_tokens=10, context_size=256),
        speed.generate_fast(model, prompt, max_new_tokens=10, context_size=256),
    )
