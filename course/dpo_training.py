"""How a DPO run is trained and tracked: its task for `course.training.run_resumable`
(the loss, the evaluation and its printed line), the history it returns and the
reward margins. Used by `course.dpo.train_model_dpo` (notebook 10).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from course.training import Task

NOTEBOOK = "10_preference_tuning_with_dpo"
CHECKPOINT_FORMAT = "course-dpo-checkpoint-1"
TRACKED = (
    "train_losses",
    "train_chosen_rewards",
    "train_rejected_rewards",
    "val_losses",
    "val_chosen_rewards",
    "val_rejected_rewards",
    "tokens_seen",
)


def freeze(model):
    """Make `model` a frozen reference: evaluation mode, no gradients. Returns it."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def require_frozen(reference_model) -> None:
    """Stop when the reference model could learn: only the policy may."""
    if any(param.requires_grad for param in reference_model.parameters()):
        raise ValueError(
            "The reference model has trainable parameters: freeze it first "
            "(course.dpo.freeze(reference_model)), so that only the policy learns."
        )


def dpo_task(batch_loss: Callable, evaluate_models: Callable[[], dict]) -> Task:
    """The DPO run for `run_resumable`: `batch_loss(batch)` trains, `evaluate_models()`
    gives `evaluate_dpo_loss_loader`'s dict, tracked and printed as the book's loop does."""

    def evaluate(progress, epoch, step):
        res = evaluate_models()
        for name in ("train", "val"):
            progress[f"{name}_losses"].append(res[f"{name}_loss"])
            progress[f"{name}_chosen_rewards"].append(res[f"{name}_chosen_reward"])
            progress[f"{name}_rejected_rewards"].append(res[f"{name}_rejected_reward"])
        progress["tokens_seen"].append(progress["tokens"])
        train_margin = res["train_chosen_reward"] - res["train_rejected_reward"]
        val_margin = res["val_chosen_reward"] - res["val_rejected_reward"]
        line = (
            f"Ep {epoch + 1} (Step {step:06d}): "
            f"Train loss {res['train_loss']:.3f}, Val loss {res['val_loss']:.3f}, "
            f"Train reward margins {train_margin:.3f}, "
            f"Val reward margins {val_margin:.3f}"
        )
        return {"loss": f"{res['train_loss']:.3f}", "margin": f"{train_margin:.3f}"}, line

    return Task(
        name="DPO",
        label="DPO",
        checkpoint_format=CHECKPOINT_FORMAT,
        notebook=NOTEBOOK,
        book_lr="5e-6",
        lr_setting="COURSE_DPO_LR",
        progress={"tokens": 0, **{key: [] for key in TRACKED}},
        token_counter="tokens",
        batch_loss=batch_loss,
        batch_tokens=lambda batch: batch["chosen"].numel(),
        evaluate=evaluate,
        history=dpo_history,
    )


def dpo_history(progress: dict) -> dict[str, Any]:
    """What `train_model_dpo` returns: the tracked values so far and where training stands."""
    history = {key: list(progress[key]) for key in TRACKED}
    history.update(
        eval_steps=list(progress["eval_steps"]),
        samples=list(progress["samples"]),
        global_step=progress["global_step"],
        train_seconds=progress["train_seconds"],
        finished=progress["finished"],
    )
    return history


def reward_margins(history: dict, split: str = "train") -> list[float]:
    """Chosen minus rejected reward at each evaluation, for "train" or "val"."""
    return [
        chosen - rejected
        for chosen, rejected in zip(
            history[f"{split}_chosen_rewards"], history[f"{split}_rejected_rewards"], strict=True
        )
    ]
