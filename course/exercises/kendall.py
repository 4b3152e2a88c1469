"""Notebook 12's exercise: Kendall's tau written from scratch, checked against scipy.stats.

`check_kendall_tau` runs the student's `kendall_tau(x, y)` on small lists (with and
without ties) and on the two real judges' shipped scores, and names the first difference.
"""

from __future__ import annotations

import math

from .results import Result, call, not_attempted, right, wrong

# (x, y, what the case teaches): scipy's tau-b is the expected value of each
KENDALL_CASES = [
    ([1, 2, 3, 4], [1, 2, 3, 4], "the same order: tau = 1"),
    ([1, 2, 3, 4], [4, 3, 2, 1], "the reverse order: tau = -1"),
    ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], "two swapped neighbours"),
    ([1, 2, 2, 3], [1, 3, 2, 4], "a tie in x"),
    ([10, 20, 20, 30, 30], [1, 1, 2, 3, 3], "ties in both lists, some in the same pairs"),
]


def _expected(x: list, y: list) -> float:
    from scipy import stats

    return float(stats.kendalltau(x, y).statistic)


def _hint(x: list, y: list, got: float) -> str:
    n = len(x)
    pairs = n * (n - 1) // 2
    tied = any(x[i] == x[j] or y[i] == y[j] for i in range(n) for j in range(i + 1, n))
    if tied:
        return (
            "with ties, divide (concordant - discordant) by sqrt((n0 - ties in x) * (n0 - "
            f"ties in y)), n0 = n(n-1)/2 = {pairs} pairs; a pair tied in x or y is neither "
            "concordant nor discordant (scipy's tau-b)."
        )
    return (
        f"count each of the {pairs} pairs (i < j) once: concordant when x and y move the "
        "same way, discordant when they move opposite ways; tau = (C - D) / pairs."
    )


def check_kendall_tau(kendall_tau, judge_scores: tuple[list, list] | None = None) -> Result:
    """`kendall_tau(x, y)` against scipy.stats.kendalltau (tau-b) on the cases above.

    `judge_scores`, two paired lists of scores (GPT-4's and Llama 3's), is checked last.
    """
    cases = list(KENDALL_CASES)
    if judge_scores is not None:
        cases.append((list(judge_scores[0]), list(judge_scores[1]), "the two judges' scores"))
    for number, (x, y, what) in enumerate(cases):
        expected = _expected(x, y)
        shown = f"kendall_tau({x}, {y})" if len(x) < 10 else f"kendall_tau(<{what}>)"
        kind, got = call(kendall_tau, x, y)
        if kind == "value" and got is None and number == 0:
            return not_attempted("12.1", "kendall_tau(x, y)")
        if kind == "error":
            return wrong(
                "12.1",
                shown,
                round(expected, 6),
                f"{type(got).__name__}: {got}",
                f"the function raised an error ({what}); it must take two lists of numbers.",
            )
        try:
            value = float(got)
        except (TypeError, ValueError):
            return wrong("12.1", shown, round(expected, 6), got, "return one number (a float).")
        if math.isnan(value) or abs(value - expected) > 1e-9:
            return wrong("12.1", shown, round(expected, 6), got, f"{what}: {_hint(x, y, value)}")
    return right(
        "12.1",
        f"{len(cases)} cases, with and without ties"
        + (", and the two judges' 100 scores," if judge_scores is not None else "")
        + " give scipy.stats.kendalltau's tau-b.",
    )
