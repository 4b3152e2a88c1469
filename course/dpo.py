"""Preference tuning with DPO (notebook 10, the bonus): the book's code, which notebook 10
writes cell by cell and compares with this copy, a fast path that gives the same loss with
less work, and `train_model_dpo`, the book's loop that survives interruptions.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import helpers

# names notebook 10, course.responses and the tests use from here (course.dpo)
from course.dpo_lineage import SFT_SHA256_KEY, check_dpo_model  # noqa: F401
from course.dpo_training import (  # noqa: F401
    CHECKPOINT_FORMAT,
    NOTEBOOK,
    TRACKED,
    dpo_history,
    dpo_task,
    freeze,
    require_frozen,
    reward_margins,
)
from course.preference_data import (  # noqa: F401
    MIN_ENTRIES,
    PREFERENCE_DATA_FILE,
    PREFERENCE_DATA_SHA256,
    PREFERENCE_FIELDS,
    PreferenceDataError,
    load_preference_data,
)
from course.speed import forward
from course.training import run_resumable

# the book's bonus run (GPT-2 medium fine-tuned as in chapter 7, beta 0.1, AdamW lr 5e-6,
# weight decay 0.01, one epoch, evaluation every 5 steps on 5 batches)
BOOK_DPO_RUN = {
    0: {"train_loss": 0.692, "val_loss": 0.693, "train_margin": 0.014, "val_margin": 0.006},
    35: {"train_loss": 0.668, "val_loss": 0.672, "train_margin": 0.529, "val_margin": 0.435},
    65: {"train_loss": 0.629, "val_loss": 0.645, "train_margin": 1.452, "val_margin": 1.070},
}


# The book's bonus code (notebook 10 writes each function and checks it equals this)
# ---------------------------------------------------------------------------------


class PreferenceDataset(Dataset):
    """Each entry as token ids: the prompt, prompt + chosen response, prompt + rejected."""

    def __init__(self, data, tokenizer, style="alpaca"):
        self.data = data
        self.encoded_texts = []
        for entry in data:
            prompt = helpers.format_input(entry, style)
            chosen_full_text = prompt + helpers.format_response({"output": entry["chosen"]}, style)
            rejected_full_text = prompt + helpers.format_response(
                {"output": entry["rejected"]}, style
            )
            self.encoded_texts.append(
                {
                    "prompt": tokenizer.encode(prompt),
                    "chosen": tokenizer.encode(chosen_full_text),
                    "rejected": tokenizer.encode(rejected_full_text),
                }
            )

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def dpo_collate_fn(
    batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True, device="cpu"
):
    """Pad `chosen` and `rejected` to one length; masks are True on the response only."""
    batch_data = {
        "prompt": [],
        "chosen": [],
        "rejected": [],
        "chosen_mask": [],
        "rejected_mask": [],
    }
    # one length for chosen and rejected, so both fit into the same forward pass
    max_length_common = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ("chosen", "rejected"):
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence) :] = False  # padding: not scored
            if mask_prompt_tokens:
                # the prompt and the 2 newlines before "### Response:": not scored
                mask[: prompt.shape[0] + 2] = False
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        tensor_stack = torch.stack(batch_data[key])  # (batch, max_length_common)
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack.to(device)
    return batch_data


def compute_logprobs(logits, labels, selection_mask=None):
    """Each row's mean log-probability of its tokens `labels` under `logits`.

    logits: (batch, tokens, vocab_size); labels: the input ids (batch, tokens), shifted
    by one here (the logits at position t predict token t + 1); selection_mask: True
    where a token counts (all tokens count without one). Returns (batch,).
    """
    labels = labels[:, 1:].clone()  # the token each position predicts
    logits = logits[:, :-1, :]  # the last position predicts nothing we have
    log_probs = F.log_softmax(logits, dim=-1)
    selected_log_probs = torch.gather(log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected_log_probs = selected_log_probs * mask  # (batch, tokens - 1)
        return selected_log_probs.sum(-1) / mask.sum(-1)
    return selected_log_probs.mean(-1)


def compute_dpo_loss(
    model_chosen_logprobs,
    model_rejected_logprobs,
    reference_chosen_logprobs,
    reference_rejected_logprobs,
    beta=0.1,
):
    """The DPO loss of a batch, and the mean rewards of its chosen and rejected responses.

    A response's reward is how much more log-probability the policy gives it than the
    reference does. Returns (loss, chosen_rewards, rejected_rewards), each a mean.
    """
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)  # log 2 where the policy equals the reference
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta):
    """The DPO loss of one batch of the collate function (gradients for the policy only)."""
    policy_chosen_logprobs = compute_logprobs(
        logits=policy_model(batch["chosen"]),
        labels=batch["chosen"],
        selection_mask=batch["chosen_mask"],
    )
    policy_rejected_logprobs = compute_logprobs(
        logits=policy_model(batch["rejected"]),
        labels=batch["rejected"],
        selection_mask=batch["rejected_mask"],
    )
    with torch.no_grad():  # the reference stays as it is
        reference_chosen_logprobs = compute_logprobs(
            logits=reference_model(batch["chosen"]),
            labels=batch["chosen"],
            selection_mask=batch["chosen_mask"],
        )
        reference_rejected_logprobs = compute_logprobs(
            logits=reference_model(batch["rejected"]),
            labels=batch["rejected"],
            selection_mask=batch["rejected_mask"],
        )
    return compute_dpo_loss(
        model_chosen_logprobs=policy_chosen_logprobs,
        model_rejected_logprobs=policy_rejected_logprobs,
        reference_chosen_logprobs=reference_chosen_logprobs,
        reference_rejected_logprobs=reference_rejected_logprobs,
        beta=beta,
    )


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None):
    """Mean loss, chosen reward and rejected reward over the first `num_batches` batches."""
    total_loss, total_chosen_rewards, total_rejected_rewards = 0.0, 0.0, 0.0
    if len(data_loader) == 0:
        return float("nan"), float("nan"), float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(
            batch=batch, policy_model=policy_model, reference_model=reference_model, beta=beta
        )
        total_loss += loss.item()
        total_chosen_rewards += chosen_rewards.item()
        total_rejected_rewards += rejected_rewards.item()
    return (
        total_loss / num_batches,
        total_chosen_rewards / num_batches,
        total_rejected_rewards / num_batches,
    )


def evaluate_dpo_loss_loader(
    policy_model, reference_model, train_loader, val_loader, beta, eval_iter
):
    """Loss and rewards on `eval_iter` training and validation batches, without gradients."""
    policy_model.eval()
    with torch.no_grad():
        train_loss, train_chosen_rewards, train_rejected_rewards = compute_dpo_loss_loader(
            train_loader, policy_model, reference_model, beta, num_batches=eval_iter
        )
        val_loss, val_chosen_rewards, val_rejected_rewards = compute_dpo_loss_loader(
            val_loader, policy_model, reference_model, beta, num_batches=eval_iter
        )
    policy_model.train()
    return {
        "train_loss": train_loss,
        "train_chosen_reward": train_chosen_rewards,
        "train_rejected_reward": train_rejected_rewards,
        "val_loss": val_loss,
        "val_chosen_reward": val_chosen_rewards,
        "val_rejected_reward": val_rejected_rewards,
    }


def train_model_dpo_simple(
    policy_model,
    reference_model,
    train_loader,
    val_loader,
    optimizer,
    num_epochs,
    beta,
    eval_freq,
    eval_iter,
    start_context,
    tokenizer,
):
    """The DPO training loop: the book's loop of notebook 05 with the DPO loss."""
    tracking = {
        "train_losses": [],
        "train_chosen_rewards": [],
        "train_rejected_rewards": [],
        "val_losses": [],
        "val_chosen_rewards": [],
        "val_rejected_rewards": [],
        "tokens_seen": [],
    }
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        policy_model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(
                batch=batch, policy_model=policy_model, reference_model=reference_model, beta=beta
            )
            loss.backward()  # gradients reach the policy only
            optimizer.step()
            tokens_seen += batch["chosen"].numel()
            global_step += 1

            if global_step % eval_freq == 0:
                res = evaluate_dpo_loss_loader(
                    policy_model, reference_model, train_loader, val_loader, beta, eval_iter
                )
                tracking["train_losses"].append(res["train_loss"])
                tracking["train_chosen_rewards"].append(res["train_chosen_reward"])
                tracking["train_rejected_rewards"].append(res["train_rejected_reward"])
                tracking["val_losses"].append(res["val_loss"])
                tracking["val_chosen_rewards"].append(res["val_chosen_reward"])
                tracking["val_rejected_rewards"].append(res["val_rejected_reward"])
                tracking["tokens_seen"].append(tokens_seen)
                train_reward_margin = res["train_chosen_reward"] - res["train_rejected_reward"]
                val_reward_margin = res["val_chosen_reward"] - res["val_rejected_reward"]
                print(
                    f"Ep {epoch + 1} (Step {global_step:06d}): "
                    f"Train loss {res['train_loss']:.3f}, Val loss {res['val_loss']:.3f}, "
                    f"Train reward margins {train_reward_margin:.3f}, "
                    f"Val reward margins {val_reward_margin:.3f}"
                )
        helpers.generate_and_print_sample(policy_model, tokenizer, loss.device, start_context)
    return tracking


def source_of(obj) -> str:
    """The source code of a function, or of a class's methods (classes defined in a
    notebook have no source file that `inspect` could read in full)."""
    if inspect.isclass(obj):
        methods = [value for value in vars(obj).values() if inspect.isfunction(value)]
        return "".join(inspect.getsource(method) for method in methods)
    return inspect.getsource(obj)


def compare_with_course_copy(*objects) -> dict[str, bool]:
    """For each function or class written in notebook 10: is its code this module's copy?

    Prints one line each and returns {name: same}.
    """
    same = {}
    for obj in objects:
        name = obj.__name__
        same[name] = name in globals() and source_of(obj) == source_of(globals()[name])
        verdict = "the same code as" if same[name] else "DIFFERENT from"
        print(f"{name:<26} {verdict} course/dpo.py")
    return same


# ---------------------------------------------------------------------------------
# The fast path: the same numbers with less work
# ---------------------------------------------------------------------------------


def sequence_logprobs_fast(model, input_ids, selection_mask=None):
    """`compute_logprobs(model(input_ids), input_ids, selection_mask)`, with less work.

    The forward pass stops after the last scored token, and the output layer (the
    largest matrix product) and the log-softmax run only where a token is scored,
    not on the prompt and the padding. Returns (batch,) mean log-probabilities.
    """
    device = model.pos_emb.weight.device
    input_ids = input_ids.to(device)
    targets = input_ids[:, 1:]  # the token each position predicts
    if selection_mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    else:
        mask = selection_mask.to(device)[:, 1:].bool()
    columns = torch.arange(targets.shape[1], device=device)
    needed = int(torch.where(mask, columns, -1).max()) + 1  # positions up to the last scored
    batch_size = input_ids.shape[0]
    if needed == 0:  # nothing scored: the mean of no tokens, as compute_logprobs gives
        return torch.full((batch_size,), float("nan"), device=device)
    hidden = forward(model, input_ids[:, :needed], return_hidden=True)
    mask, targets = mask[:, :needed], targets[:, :needed]
    logits = model.out_head(hidden[mask])  # (scored tokens, vocab_size)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    token_log_probs = log_probs.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(batch_size, device=device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(batch_size, device=device).index_add(0, rows, token_log_probs)
    return sums / mask.sum(-1)


def compute_dpo_loss_batch_fast(batch, policy_model, reference_model, beta):
    """`compute_dpo_loss_batch` with `sequence_logprobs_fast`: the same loss and rewards.

    The chosen and rejected responses (padded to one length by the collate function) go
    through each model in one forward pass.
    """
    chosen, rejected = batch["chosen"], batch["rejected"]
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in "
            "shape: use the collate function of notebook 10, which pads both to one length."
        )
    input_ids = torch.cat([chosen, rejected])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    n = chosen.shape[0]
    policy = sequence_logprobs_fast(policy_model, input_ids, mask)
    with torch.no_grad():
        reference = sequence_logprobs_fast(reference_model, input_ids, mask)
    return compute_dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=beta)


def compute_dpo_loss_loader_fast(
    data_loader, policy_model, reference_model, beta, num_batches=None
):
    """`compute_dpo_loss_loader` over `compute_dpo_loss_batch_fast`."""
    if len(data_loader) == 0:
        return float("nan"), float("nan"), float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    totals = [0.0, 0.0, 0.0]
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        values = compute_dpo_loss_batch_fast(batch, policy_model, reference_model, beta)
        totals = [total + value.item() for total, value in zip(totals, values, strict=True)]
    return tuple(total / num_batches for total in totals)


def evaluate_dpo_fast(policy_model, reference_model, train_loader, val_loader, beta, eval_iter):
    """`evaluate_dpo_loss_loader` over `compute_dpo_loss_batch_fast`."""
    policy_model.eval()
    res = {}
    with torch.no_grad():
        for name, loader in (("train", train_loader), ("val", val_loader)):
            loss, chosen, rejected = compute_dpo_loss_loader_fast(
                loader, policy_model, reference_model, beta, num_batches=eval_iter
            )
            res[f"{name}_loss"] = loss
            res[f"{name}_chosen_reward"] = chosen
            res[f"{name}_rejected_reward"] = rejected
    policy_model.train()
    return res


def train_model_dpo(
    policy_model,
    reference_model,
    train_loader,
    val_loader,
    optimizer,
    device,
    num_epochs: int,
    beta: float,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
    **options,
) -> dict[str, Any]:
    """`train_model_dpo_simple` that survives interruptions, with a progress bar.

    The same steps, evaluations and printed lines as the book's loop (with fp32, the
    same losses and rewards, through `compute_dpo_loss_batch_fast`), run by
    `course.training.run_resumable`, the loop of fine-tuning. In addition, these keywords
    (`course.resumable.LoopOptions`):

    - `checkpoint_path`: the policy's weights, the optimizer, the random number
      generators, the position in the epoch and the tracked values are saved there
      every `checkpoint_minutes`, every `checkpoint_every` steps and after every epoch;
      if the file exists, training continues from it and ends as an uninterrupted run
      would. A finished run is not repeated (its weights are loaded) unless `force`.
    - `run_config`: what else defines the run (model, data, the reference's weights,
      ...); a checkpoint saved with other values is not continued.
    - `precision`: "fp32", or "bf16" / "fp16" mixed precision.
    - `max_steps`: stop after this many steps in this call, with a checkpoint.

    The reference model is never changed (`freeze` it first). Returns the book's
    tracking lists (`train_losses`, `train_chosen_rewards`, ..., `tokens_seen`) plus
    `eval_steps`, `samples`, `global_step`, `train_seconds` and `finished`.
    """
    require_frozen(reference_model)
    task = dpo_task(
        batch_loss=lambda batch: compute_dpo_loss_batch_fast(
            batch, policy_model, reference_model, beta
        )[0],
        evaluate_models=lambda: evaluate_dpo_fast(
            policy_model, reference_model, train_loader, val_loader, beta, eval_iter
        ),
    )
    options["run_config"] = {"beta": beta, **(options.get("run_config") or {})}
    book = (num_epochs, eval_freq, eval_iter, start_context, tokenizer)
    return run_resumable(task, policy_model, train_loader, optimizer, device, book, **options)
