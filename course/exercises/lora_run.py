"""Exercise 7.4 in notebook 05's run: whose LoRA code goes in before the chapter's
training (`chapter_lora_code`), and whether the exercise's last cell trains the run
again with the student's layer (`train_again_with_yours`). The log says who trained it.
"""

from __future__ import annotations

from course import artifacts
from course.exercises.lora import check_lora

YOURS, COURSE = "yours", "course"
TRAINED_BY = {YOURS: "your LinearWithLoRA", COURSE: "the course's solution (helpers.py)"}


def trained_by(stem: str) -> str | None:
    """Whose LoRA code trained the finished run `stem`, as its training log records it:
    "yours" or "course" (also for a log that does not say: `python -m course.finetune`
    trains with the course's code); None when there is no readable log."""
    try:
        config = artifacts.read_training_log(stem)["config"]
    except (artifacts.ArtifactError, KeyError, TypeError):
        return None
    return config.get("lora_code", COURSE) if isinstance(config, dict) else None


def chapter_lora_code(namespace: dict, stem: str, retrain: bool = False):
    """(replace_linear_with_lora, code, message) for section 5 of notebook 05.

    The student's, when `namespace` (the notebook's globals()) holds exercise 7.4's
    LinearWithLoRA and replace_linear_with_lora and the check says right (code
    "yours"); otherwise the course's solution (code "course"), and the message says
    whether a finished run is loaded (and whose code trained it) or the course's code
    trains it until the exercise at the end trains it again with the student's.
    """
    import helpers

    student = namespace.get("LinearWithLoRA"), namespace.get("replace_linear_with_lora")
    if None in student:
        why = "exercise 7.4, at the end of this notebook, has not run in this kernel yet"
    else:
        status = check_lora(*student).status
        if status == "right":
            return (
                student[1],
                YOURS,
                (
                    "LoRA trains with your LinearWithLoRA and replace_linear_with_lora "
                    "(exercise 7.4's check says right)."
                ),
            )
        why = f"exercise 7.4's check says {status} for yours"
    recorded = None if retrain else trained_by(stem)
    if recorded is not None:
        return (
            helpers.replace_linear_with_lora,
            COURSE,
            (
                f"The adapters come from the course's solution ({why}). This run has finished "
                f"before: the training cell loads it (when its settings are these), and its "
                f"training log says {TRAINED_BY.get(recorded, recorded)} trained it."
            ),
        )
    return (
        helpers.replace_linear_with_lora,
        COURSE,
        (
            f"LoRA trains with the course's solution (helpers.LinearWithLoRA): {why}. The "
            "exercise's section at the end of this notebook trains this run again with your "
            "layer once your check says right."
        ),
    )


def train_again_with_yours(finetune: str, check, stem: str) -> tuple[bool, str]:
    """(whether to train the run again with the student's layer, what to print), for the
    cell after exercise 7.4's check; `check` is the check's Result."""
    if finetune != "lora":
        return False, (
            "This run is full fine-tuning (the book's), so nothing trains here. To train "
            "LoRA with your layer, start JupyterLab with COURSE_FINETUNE=lora (or set "
            'FINETUNE = "lora" in the parameters cell) and run the notebook from the top: '
            "the adapters go in before the training cell, and this cell trains the run "
            "again with your code once your check says right."
        )
    if check.status != "right":
        return False, (
            f"Exercise 7.4's check says {check.status}: the course's solution "
            "(helpers.LinearWithLoRA) trained this run. Once the check says right, run "
            "this cell again: it trains the run with your layer."
        )
    if trained_by(stem) == YOURS:
        return False, (
            "Your LinearWithLoRA and replace_linear_with_lora trained this run already "
            "(its training log says so): nothing to train again."
        )
    return True, (
        "Exercise 7.4's check says right, and the course's solution trained this run: it "
        "trains again now with your LinearWithLoRA and replace_linear_with_lora, from the "
        "pretrained weights with the same seed and the chapter's call. Its -sft.pth and "
        "training log are overwritten (for a correct layer the weights are the same)."
    )
