"""The roadmap figure: the chapter's three stages, and "you are here" on the right step."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from course import roadmap

ROOT = Path(__file__).resolve().parent.parent


def _marked_step(fig) -> int:
    """The step whose box holds the bold title, and where "you are here" points."""
    ax = fig.axes[0]
    here = [t for t in ax.texts if t.get_text() == "you are here"]
    assert len(here) == 1, "exactly one 'you are here' per roadmap"
    bold = [
        t for t in ax.texts if t.get_fontweight() == "bold" and t.get_text()[:2].strip().isdigit()
    ]
    assert len(bold) == 1, [t.get_text() for t in bold]
    number = int(bold[0].get_text().split()[0])
    # the arrow's tip lies on the marked box: same column (steps) or same row (bonus)
    tip_x, tip_y = here[0].xy
    box_x, box_y = bold[0].get_position()
    assert abs(tip_x - box_x) < 0.7 or abs(tip_y - box_y) < 0.1
    return number


@pytest.mark.parametrize("notebook", range(1, 13))
def test_the_roadmap_marks_the_notebooks_step(notebook):
    fig = roadmap.draw(notebook)
    try:
        assert _marked_step(fig) == notebook
        texts = {t.get_text() for t in fig.axes[0].texts}
        assert {"Stage 1: preparing the dataset", "Stage 2: fine-tuning the LLM"} <= texts
        assert "Stage 3: evaluating the LLM" in texts
    finally:
        plt.close(fig)


def test_steps_before_the_notebook_are_done_and_after_it_later():
    assert [roadmap.state(s, 5) for s in (4, 5, 6)] == ["done", "here", "later"]
    assert all(roadmap.state(s, 10) == "done" for s in range(1, 10))


def test_a_notebook_the_course_does_not_have_is_refused():
    with pytest.raises(ValueError, match="notebooks 1 to 12"):
        roadmap.draw(13)


def test_every_notebook_shows_its_own_roadmap_in_its_introduction():
    notebooks = sorted(ROOT.glob("[0-9][0-9]_*.ipynb"))
    assert len(notebooks) >= 10
    for path in notebooks:
        number = int(path.name[:2])
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        calls = [
            i
            for i, c in enumerate(cells)
            if c["cell_type"] == "code" and f"course.roadmap.show({number})" in "".join(c["source"])
        ]
        assert len(calls) == 1, f"{path.name}: one roadmap cell for notebook {number}"
        setup = next(
            i
            for i, c in enumerate(cells)
            if "colab-setup" in c["metadata"].get("tags", []) and c["cell_type"] == "code"
        )
        # in the introduction, right after the Colab set-up (which fetches `course` on Colab)
        assert calls[0] == setup + 1, f"{path.name}: the roadmap belongs in the introduction"
        outputs = cells[calls[0]].get("outputs", [])
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: figure stored"
