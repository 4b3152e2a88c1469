"""The chapter's roadmap (the book's figure 7.3): three stages of three steps, the bonus
notebooks beside them, and "you are here" on the step a notebook teaches. Every notebook's
introduction draws it with `show`.
"""

from __future__ import annotations

STAGES = [
    (
        "Stage 1: preparing the dataset",
        [
            (1, "Dataset download\nand formatting"),
            (2, "Batching the\ndataset"),
            (3, "Creating data\nloaders"),
        ],
    ),
    (
        "Stage 2: fine-tuning the LLM",
        [
            (4, "Loading a\npretrained LLM"),
            (5, "Instruction\nfine-tuning"),
            (6, "Inspecting the\nmodeling loss"),
        ],
    ),
    (
        "Stage 3: evaluating the LLM",
        [
            (7, "Extracting\nresponses"),
            (8, "Qualitative\nevaluation"),
            (9, "Scoring the\nresponses"),
        ],
    ),
]
BONUS = [
    (10, "Preference tuning\nwith DPO"),
    (11, "Take your\nmodel home"),
    (12, "Can you trust\nthe judge?"),
]
STEPS = {number: title for _, steps in STAGES for number, title in steps} | dict(BONUS)

HERE_COLOUR, DONE_COLOUR, LATER_COLOUR = "#f4a261", "#a8dadc", "#f1faee"


def state(step: int, notebook: int) -> str:
    """ "here", "done" or "later": how `step` stands for a student in `notebook`.

    In a bonus notebook the whole chapter (1-9) is done."""
    if step == notebook:
        return "here"
    return "done" if step < notebook else "later"


def draw(notebook: int):
    """Draw the roadmap with `notebook`'s step marked; returns the matplotlib figure."""
    if notebook not in STEPS:
        raise ValueError(
            f"There is no notebook {notebook}: the course has notebooks 1 to {max(STEPS)}."
        )
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    colours = {"here": HERE_COLOUR, "done": DONE_COLOUR, "later": LATER_COLOUR}
    fig, ax = plt.subplots(figsize=(12, 2.9))
    ax.set_xlim(0, 12.7)
    ax.set_ylim(0, 3.1)
    ax.axis("off")

    def box(x, y, w, h, text, colour, bold=False, size=8.5):
        ax.add_patch(
            FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=colour, ec="#1d3557")
        )
        ax.text(
            x + w / 2,
            y + h / 2,
            text,
            ha="center",
            va="center",
            fontsize=size,
            fontweight="bold" if bold else "normal",
        )

    for s, (stage, steps) in enumerate(STAGES):
        x0 = 0.1 + s * 3.3
        ax.add_patch(
            FancyBboxPatch(
                (x0, 0.35), 3.1, 2.45, boxstyle="round,pad=0.05", fc="white", ec="#457b9d", ls="--"
            )
        )
        ax.text(x0 + 1.55, 2.6, stage, ha="center", va="center", fontsize=10, fontweight="bold")
        for i, (number, title) in enumerate(steps):
            where = state(number, notebook)
            box(
                x0 + 0.08 + i * 1.0,
                1.0,
                0.92,
                1.2,
                f"{number}\n{title}",
                colours[where],
                bold=where == "here",
                size=7,
            )
            if where == "here":
                mark_here(ax, (x0 + 0.54 + i * 1.0, 0.98), (x0 + 0.54 + i * 1.0, 0.5), "center")
    ax.text(10.6, 2.6, "Bonus", ha="center", va="center", fontsize=10, fontweight="bold")
    for i, (number, title) in enumerate(BONUS):
        where = state(number, notebook)
        y = 1.85 - i * 0.72
        box(10.0, y, 1.2, 0.62, f"{number} {title}", colours[where], bold=where == "here", size=7)
        if where == "here":
            mark_here(ax, (11.22, y + 0.31), (11.45, y + 0.31), "left")
    fig.tight_layout()
    return fig


def show(notebook: int) -> None:
    """Draw the roadmap for `notebook` in a Jupyter notebook (figure only, no text)."""
    import matplotlib.pyplot as plt

    draw(notebook)
    plt.show()


def mark_here(ax, box_edge: tuple, label_at: tuple, align: str) -> None:
    """The "you are here" label at `label_at`, its arrow pointing at `box_edge`."""
    ax.annotate(
        "you are here",
        box_edge,
        label_at,
        ha=align,
        va="center",
        fontsize=9,
        fontweight="bold",
        color="#e76f51",
        arrowprops={"arrowstyle": "->", "color": "#e76f51"},
    )
