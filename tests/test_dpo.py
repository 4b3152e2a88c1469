"""DPO (notebook 10): the data, the masks, the loss, and training that only moves the policy.

Small models (the offline model's shape, random weights) and a few preference pairs,
so every test runs on a CPU in seconds.
"""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import helpers
from course import dpo, settings
from course.artifacts import sha256_of_file

ROOT = Path(__file__).resolve().parent.parent
# the value in the data's published SHA256SUMS, written here by hand
PREFERENCE_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
LOG2 = math.log(2)


@pytest.fixture(scope="module")
def preference_data():
    return dpo.load_preference_data()


def make_model(seed=0):
    """GPT-2's vocabulary with a tiny body (smaller still than the offline model)."""
    torch.manual_seed(seed)
    config = {**settings.model_config(settings.OFFLINE_MODEL), "emb_dim": 16, "context_length": 256}
    return helpers.GPTModel(config)


def make_loader(entries, tokenizer, batch_size=2, shuffle=False, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return DataLoader(
        dpo.PreferenceDataset(entries, tokenizer),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        collate_fn=partial(dpo.dpo_collate_fn, allowed_max_length=1024),
    )


# -- the data -------------------------------------------------------------------------


def test_preference_data_is_the_published_file(preference_data):
    path = ROOT / "instruction-data-with-preference.json"
    assert sha256_of_file(path) == PREFERENCE_SHA256
    assert dpo.PREFERENCE_DATA_SHA256 == PREFERENCE_SHA256
    assert len(preference_data) == 1100
    train, val, test = helpers.split_data(preference_data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    # the same instructions, in the same order, as the instruction data of notebooks 01-05
    instructions = json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))
    assert [e["instruction"] for e in preference_data] == [e["instruction"] for e in instructions]


def test_a_changed_or_damaged_preference_file_names_itself(tmp_path, preference_data):
    changed = tmp_path / "prefs.json"
    changed.write_text(json.dumps(preference_data[:-1]), encoding="utf-8")
    with pytest.raises(dpo.PreferenceDataError, match="prefs.json.*SHA-256"):
        dpo.load_preference_data(changed, expected_sha256=PREFERENCE_SHA256)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"instruction": "x", "input": "", "chosen": "y"}] * 30))
    with pytest.raises(dpo.PreferenceDataError, match='entry 0 has no string field "rejected"'):
        dpo.load_preference_data(broken)
    few = tmp_path / "few.json"
    few.write_text(json.dumps(preference_data[:5]), encoding="utf-8")
    with pytest.raises(dpo.PreferenceDataError, match="5 entries.*at least 20"):
        dpo.load_preference_data(few)


# -- the collate function's masks ------------------------------------------------------


def test_masks_leave_out_prompt_and_padding(tokenizer, preference_data):
    entries = [preference_data[0], preference_data[1045]]  # responses of different lengths
    items = [dpo.PreferenceDataset(entries, tokenizer)[i] for i in range(2)]
    batch = dpo.dpo_collate_fn(items)
    width = max(len(item[key]) for item in items for key in ("chosen", "rejected")) + 1
    assert batch["chosen"].shape == batch["rejected"].shape == (2, width)
    for row, (entry, item) in enumerate(zip(entries, items, strict=True)):
        for key in ("chosen", "rejected"):
            ids, mask = batch[key][row], batch[f"{key}_mask"][row]
            prompt_len, length = len(item["prompt"]), len(item[key])
            assert mask.dtype == torch.bool
            assert not mask[: prompt_len + 2].any()  # the prompt and the two newlines
            assert not mask[length:].any()  # the padding
            assert mask[prompt_len + 2 : length].all()  # everything else: the response
            assert (ids[length:] == 50256).all()
            scored = tokenizer.decode(ids[mask].tolist())
            assert scored == "### Response:\n" + entry[key]
            assert ids[:prompt_len].tolist() == item["prompt"]
    unmasked = dpo.dpo_collate_fn(items, mask_prompt_tokens=False)
    assert unmasked["chosen_mask"][0, 0]  # without prompt masking only padding is out


def test_compute_logprobs_shifts_and_averages_the_selected_tokens():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = []
    for row in range(2):
        scored = [log_probs[row, t - 1, labels[row, t]] for t in range(1, 5) if mask[row, t]]
        expected.append(sum(scored) / len(scored))
    result = dpo.compute_logprobs(logits, labels, mask)
    assert torch.allclose(result, torch.stack(expected))
    # masked positions do not matter, whatever their logits say
    changed = logits.clone()
    changed[0, 3:] = 100.0  # position 3 predicts token 4, which row 0 does not score
    changed[0, 0] = -100.0  # position 0 predicts token 1, not scored either
    assert torch.allclose(dpo.compute_logprobs(changed, labels, mask)[0], result[0])
    # without a mask: the mean over every token after the first
    all_tokens = torch.stack(
        [
            torch.stack([log_probs[r, t - 1, labels[r, t]] for t in range(1, 5)]).mean()
            for r in (0, 1)
        ]
    )
    assert torch.allclose(dpo.compute_logprobs(logits, labels), all_tokens)


# -- the loss --------------------------------------------------------------------------


def test_dpo_loss_is_log_2_when_policy_and_reference_are_the_same_model(tokenizer, preference_data):
    policy = make_model()
    reference = dpo.freeze(copy.deepcopy(policy))
    batch = next(iter(make_loader(preference_data[:4], tokenizer)))
    for compute in (dpo.compute_dpo_loss_batch, dpo.compute_dpo_loss_batch_fast):
        loss, chosen_rewards, rejected_rewards = compute(batch, policy, reference, beta=0.1)
        assert loss.item() == pytest.approx(LOG2, abs=1e-6)
        assert chosen_rewards.item() == pytest.approx(0.0, abs=1e-6)
        assert rejected_rewards.item() == pytest.approx(0.0, abs=1e-6)
    # the same model as its own reference gives log 2 exactly
    loss, _, _ = dpo.compute_dpo_loss_batch(batch, policy, policy, beta=0.1)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7)


def test_dpo_loss_falls_when_the_policy_raises_the_chosen_log_probability():
    reference_chosen, reference_rejected = torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -1.0])
    losses = []
    for raise_by in (0.0, 0.5, 1.0, 4.0):
        loss, chosen_reward, rejected_reward = dpo.compute_dpo_loss(
            reference_chosen + raise_by, reference_rejected, reference_chosen, reference_rejected
        )
        assert chosen_reward.item() == pytest.approx(raise_by)
        assert rejected_reward.item() == pytest.approx(0.0)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(LOG2)
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    # -log sigmoid(beta * margin): with beta 0.1 and a margin of 4, 0.513
    assert losses[-1] == pytest.approx(-math.log(1 / (1 + math.exp(-0.4))))
    # lowering the rejected response's log-probability lowers the loss too
    lower_rejected, _, rejected_reward = dpo.compute_dpo_loss(
        reference_chosen, reference_rejected - 1.0, reference_chosen, reference_rejected
    )
    assert lower_rejected.item() < LOG2 and rejected_reward.item() == pytest.approx(-1.0)


def test_fast_loss_equals_the_book_loss(tokenizer, preference_data):
    reference = dpo.freeze(make_model(0))
    policy = make_model(1)  # another model: rewards far from zero
    batch = next(iter(make_loader(preference_data[:3], tokenizer, batch_size=3)))
    plain = dpo.compute_dpo_loss_batch(batch, policy, reference, beta=0.1)
    fast = dpo.compute_dpo_loss_batch_fast(batch, policy, reference, beta=0.1)
    for a, b in zip(plain, fast, strict=True):
        assert a.item() == pytest.approx(b.item(), abs=1e-5)
    assert abs(plain[1].item()) > 1e-3  # the rewards are not trivially zero
    # and the gradients agree
    plain[0].backward()
    plain_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    fast[0].backward()
    for grad, param in zip(plain_grads, policy.parameters(), strict=True):
        assert torch.allclose(grad, param.grad, atol=1e-6, rtol=1e-4)


# -- training --------------------------------------------------------------------------


def dpo_run(tokenizer, data, *, max_steps=None, checkpoint_path=None, lr=1e-3, seed=123, **kw):
    """A small DPO run as notebook 10 does it: 8 training pairs, batches of 2, 4 steps an epoch."""
    policy = make_model(0)
    reference = dpo.freeze(make_model(0))
    train_loader = make_loader(data[:8], tokenizer, shuffle=True, seed=seed)
    val_loader = make_loader(data[1045:1049], tokenizer)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.01)
    history = dpo.train_model_dpo(
        policy,
        reference,
        train_loader,
        val_loader,
        optimizer,
        "cpu",
        num_epochs=kw.pop("num_epochs", 1),
        beta=kw.pop("beta", 0.1),
        eval_freq=2,
        eval_iter=2,
        start_context=helpers.format_input(data[1045]),
        tokenizer=tokenizer,
        checkpoint_path=checkpoint_path,
        max_steps=max_steps,
        show_progress=False,
        **kw,
    )
    return history, policy, reference


def test_training_moves_only_the_policy_and_widens_the_margin(tokenizer, preference_data, capsys):
    history, policy, reference = dpo_run(tokenizer, preference_data, num_epochs=2)
    untouched = make_model(0).state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, untouched[name]), name  # bit for bit
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    changed = [n for n, t in policy.state_dict().items() if not torch.equal(t, untouched[n])]
    assert "out_head.weight" in changed and len(changed) > 10
    assert history["finished"] and history["global_step"] == 7
    assert history["eval_steps"] == [0, 2, 4, 6]
    margins = dpo.reward_margins(history)
    assert margins[-1] > margins[0] and history["train_losses"][-1] < LOG2
    printed = capsys.readouterr().out
    assert "Ep 2 (Step 000006): Train loss" in printed and "Train reward margins" in printed


def test_an_unfrozen_reference_is_refused(tokenizer, preference_data):
    policy, reference = make_model(0), make_model(0)
    loader = make_loader(preference_data[:4], tokenizer)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="freeze it first"):
        dpo.train_model_dpo(
            policy, reference, loader, loader, optimizer, "cpu", 1, 0.1, 1, 1, "x", tokenizer
        )


def test_resumable_training_equals_the_book_loop(tokenizer, preference_data, capsys):
    history, fast_policy, _ = dpo_run(tokenizer, preference_data)
    policy = make_model(0)
    reference = dpo.freeze(make_model(0))
    train_loader = make_loader(preference_data[:8], tokenizer, shuffle=True, seed=123)
    val_loader = make_loader(preference_data[1045:1049], tokenizer)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    tracking = dpo.train_model_dpo_simple(
        policy,
        reference,
        train_loader,
        val_loader,
        optimizer,
        num_epochs=1,
        beta=0.1,
        eval_freq=2,
        eval_iter=2,
        start_context=helpers.format_input(preference_data[1045]),
        tokenizer=tokenizer,
    )
    for key in dpo.TRACKED:
        assert history[key] == pytest.approx(tracking[key], abs=2e-5), key
    for name, tensor in policy.state_dict().items():
        assert torch.allclose(tensor, fast_policy.state_dict()[name], atol=1e-5), name


def test_an_interrupted_run_continues_exactly(tmp_path, tokenizer, preference_data, capsys):
    whole, whole_policy, _ = dpo_run(tokenizer, preference_data, num_epochs=2)
    checkpoint = tmp_path / "dpo-checkpoint.pth"
    # stopped mid-epoch, then at an epoch's end, then run to the end: each in a new "session"
    for max_steps in (3, 1, None):
        history, policy, _ = dpo_run(
            tokenizer,
            preference_data,
            num_epochs=2,
            max_steps=max_steps,
            checkpoint_path=checkpoint,
        )
    assert (
        "Continuing from dpo-checkpoint.pth: epoch 1, 4 of 8 steps done." in capsys.readouterr().out
    )
    assert history["finished"]
    for key in (*dpo.TRACKED, "eval_steps", "samples"):
        assert history[key] == whole[key], key
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, whole_policy.state_dict()[name]), name
    # a finished run is not repeated: its policy is loaded
    again, again_policy, _ = dpo_run(
        tokenizer, preference_data, num_epochs=2, checkpoint_path=checkpoint
    )
    assert "already finished" in capsys.readouterr().out
    assert again["train_losses"] == whole["train_losses"]
    assert torch.equal(again_policy.out_head.weight, whole_policy.out_head.weight)


def test_ctrl_c_keeps_the_last_checkpoint(
    tmp_path, tokenizer, preference_data, capsys, monkeypatch
):
    whole, whole_policy, _ = dpo_run(tokenizer, preference_data)
    checkpoint = tmp_path / "dpo-checkpoint.pth"
    original = dpo.evaluate_dpo_fast
    calls = []

    def interrupted(*args, **kwargs):  # Ctrl+C during the second evaluation (step 2)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, "evaluate_dpo_fast", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dpo_run(tokenizer, preference_data, checkpoint_path=checkpoint, checkpoint_every=2)
    assert "Interrupted. The last checkpoint is in dpo-checkpoint.pth" in capsys.readouterr().out
    monkeypatch.setattr(dpo, "evaluate_dpo_fast", original)
    history, policy, _ = dpo_run(tokenizer, preference_data, checkpoint_path=checkpoint)
    assert "2 of 4 steps done" in capsys.readouterr().out
    assert history["train_losses"] == whole["train_losses"]
    assert torch.equal(policy.out_head.weight, whole_policy.out_head.weight)


KILLED_RUN = """
import json, sys, time
import torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import helpers
from course import dpo
import test_dpo

torch.set_num_threads(1)
data = dpo.load_preference_data()
tokenizer = helpers.get_tokenizer()
original = dpo.compute_dpo_loss_batch_fast

def slow(*args, **kwargs):  # slow enough to be killed in the middle
    time.sleep(0.3)
    return original(*args, **kwargs)

dpo.compute_dpo_loss_batch_fast = slow
history, policy, _ = test_dpo.dpo_run(
    tokenizer, data, num_epochs=2, checkpoint_path=sys.argv[1], checkpoint_every=1
)
torch.save(policy.state_dict(), sys.argv[2])
with open(sys.argv[3], "w") as f:
    json.dump(history, f)
"""


def test_a_killed_process_continues_exactly(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(name):
        args = [sys.executable, str(script), str(tmp_path / f"{name}.pth")]
        args += [str(tmp_path / f"{name}-policy.pth"), str(tmp_path / f"{name}.json")]
        return args

    subprocess.run(run("whole"), env=env, check=True, capture_output=True, timeout=300)
    process = subprocess.Popen(run("killed"), env=env, stdout=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed.pth"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists():
            step = torch.load(checkpoint, weights_only=True)["progress"]["global_step"]
            if step >= 3:  # a few steps in: kill -9, no chance to clean up
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    assert not (tmp_path / "killed.json").exists()
    resumed = subprocess.run(run("killed"), env=env, check=True, capture_output=True, text=True)
    assert "Continuing from killed.pth" in resumed.stdout
    whole = json.loads((tmp_path / "whole.json").read_text())
    killed = json.loads((tmp_path / "killed.json").read_text())
    assert whole.pop("train_seconds") > 0 and killed.pop("train_seconds") > 0  # (the clock)
    assert killed == whole
    whole_policy = torch.load(tmp_path / "whole-policy.pth", weights_only=True)
    killed_policy = torch.load(tmp_path / "killed-policy.pth", weights_only=True)
    assert all(torch.equal(killed_policy[k], whole_policy[k]) for k in whole_policy)


def test_a_checkpoint_of_other_settings_is_not_continued(
    tmp_path, tokenizer, preference_data, capsys
):
    checkpoint = tmp_path / "dpo-checkpoint.pth"
    dpo_run(tokenizer, preference_data, max_steps=2, checkpoint_path=checkpoint)
    with pytest.raises(ValueError, match="beta 0.1 then, 0.5 now"):
        dpo_run(tokenizer, preference_data, checkpoint_path=checkpoint, beta=0.5)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="dpo-checkpoint.pth could not be read.*notebook 10"):
        dpo_run(tokenizer, preference_data, checkpoint_path=checkpoint)


def test_a_loss_that_is_not_a_number_stops_training(tokenizer, preference_data):
    policy = make_model(0)
    reference = dpo.freeze(make_model(0))
    with torch.no_grad():
        policy.out_head.weight.fill_(float("nan"))
    loader = make_loader(preference_data[:4], tokenizer, shuffle=True, seed=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    with pytest.raises(FloatingPointError, match="COURSE_DPO_LR"):
        dpo.train_model_dpo(
            policy,
            reference,
            loader,
            loader,
            optimizer,
            "cpu",
            1,
            0.1,
            1,
            1,
            "x",
            tokenizer,
            show_progress=False,
        )


def test_dpo_settings_are_checked(monkeypatch):
    assert settings.setting("COURSE_DPO_BETA") == 0.1
    assert settings.setting("COURSE_DPO_LR") == 5e-6
    assert settings.setting("COURSE_DPO_EPOCHS") == 1
    monkeypatch.setenv("COURSE_DPO_BETA", "0")
    with pytest.raises(settings.SettingError, match="COURSE_DPO_BETA"):
        settings.setting("COURSE_DPO_BETA")
    monkeypatch.setenv("COURSE_DPO_LIMIT", "-1")
    with pytest.raises(settings.SettingError, match="COURSE_DPO_LIMIT"):
        settings.setting("COURSE_DPO_LIMIT")
