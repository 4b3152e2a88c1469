"""Statistics for judging a judge: rank agreement, paired intervals, length and position bias.

Notebook 12 (bonus) and `course.judge_check` use these on two real judges' shipped
scores (`load_judge_scores`) and on a live judge's verdicts, with scipy.stats.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

# judge-scores/: the book's bonus material on model evaluation, as published
JUDGE_SCORES_SHA256 = {
    "eval-example-data.json": "90e9ceb4f1184f6b307fd76d0dd1e8b15bd3da200b1fc69ee897107394a775e0",
    "gpt4-model-1-response.json": "705f24bf17878d5e29c5cb2daeae00a64a1688756192478f91f41bf1eff85689",
    "gpt4-model-2-response.json": "2b10d2abdf1f71f4f8057c012be2bf6c777823adbadb597f4d1699e06129db5a",
    "llama3-8b-model-1-response.json": "a6005211110bf3d9e30dbdb17638a1918004bc490c85b0b3520798a31d7fa5a4",
    "llama3-8b-model-2-response.json": "18e501530c56085aca3e6c2d7da39edc03fd85fe205f17a65ab1a400c6d61125",
}


def load_judge_scores(folder: str | Path) -> dict:
    """The shipped files of `folder` (judge-scores/) by name, each checked against its SHA-256.

    A missing or changed file raises ArtifactError naming it and how to restore it.
    """
    from course.artifacts import ArtifactError

    loaded = {}
    for name, expected in JUDGE_SCORES_SHA256.items():
        path = Path(folder) / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        else:
            if hashlib.sha256(data).hexdigest() == expected:
                loaded[name] = json.loads(data.decode("utf-8"))
                continue
            problem = "is not the shipped file (its SHA-256 differs: damaged or edited)"
        raise ArtifactError(
            f"judge-scores/{name} {problem}. Restore it with `git checkout -- "
            f"judge-scores/{name}` (or download the course again); nothing was changed."
        )
    return loaded


def _number(value: float) -> float | None:
    """A float for JSON: None (null), not NaN, when a statistic is undefined."""
    value = float(value)
    return None if math.isnan(value) else value


def correlations(x: list[float], y: list[float]) -> dict:
    """Pearson, Spearman and Kendall's tau of two paired lists (None where undefined).

    Pearson compares the values, Spearman their ranks, Kendall the share of pairs of
    entries that both lists order the same way minus the share they order differently.
    """
    if len(x) != len(y):
        raise ValueError(
            f"{len(x)} values against {len(y)}: a correlation needs one value of each list "
            "per entry, in the same order."
        )
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"pearson": None, "spearman": None, "kendall": None, "n": len(x)}
    return {
        "pearson": _number(stats.pearsonr(x, y).statistic),
        "spearman": _number(stats.spearmanr(x, y).statistic),
        "kendall": _number(stats.kendalltau(x, y).statistic),
        "n": len(x),
    }


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation of two paired lists, None when one of them is constant."""
    return correlations(x, y)["spearman"]


def paired_interval(differences: list[float], resamples: int = 10_000, seed: int = 123) -> dict:
    """Mean of paired differences and its 95% bootstrap interval (entries resampled)."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        raise ValueError(f"{len(d)} paired differences: a paired interval needs at least 2.")
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"n": len(d), "mean": float(d.mean()), "ci95": [float(low), float(high)]}


def unpaired_interval(
    a: list[float], b: list[float], resamples: int = 10_000, seed: int = 123
) -> dict:
    """Difference of two means with a 95% bootstrap interval, each list resampled alone.

    For scores that cannot be paired entry by entry (a list that lost an entry).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    boot_a = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)
    boot_b = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
    low, high = np.percentile(boot_a - boot_b, [2.5, 97.5])
    return {"mean": float(a.mean() - b.mean()), "ci95": [float(low), float(high)]}


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided sign test: the chance of a split at least this uneven if both were equal.

    Ties are left out, as the sign test does. None when there is no win and no loss.
    """
    if wins + losses == 0:
        return None
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def largest_disagreements(x: list[float], y: list[float], top: int = 5) -> list[int]:
    """The indices of the `top` entries where x and y differ most (ties: first entry first)."""
    order = sorted(range(len(x)), key=lambda i: (-abs(x[i] - y[i]), i))
    return order[:top]


def word_count(text: str) -> int:
    """The length of a response in words (separated by white space)."""
    return len(text.split())


def length_score_spearman(responses: list[str], scores: list[int | None]) -> float | None:
    """Spearman correlation of response length (words) against score, unreadable left out."""
    kept = [(word_count(r), s) for r, s in zip(responses, scores, strict=True) if s is not None]
    if not kept:
        return None
    lengths, readable = zip(*kept, strict=True)
    return spearman(list(lengths), list(readable))


def pair_outcome(first: str | None, second: str | None) -> str | None:
    """The outcome of one pair judged in both orders, from your side.

    `first` is the verdict with your answer shown as A, `second` with it shown as B
    ("A", "B", "C" or None for an unreadable reply). Returns "win", "loss" or "tie"
    when both orders agree, "inconsistent" when the order changed the winner, and
    None when a reply had no verdict.
    """
    if first is None or second is None:
        return None
    yours_first = {"A": "win", "B": "loss", "C": "tie"}[first]
    yours_second = {"B": "win", "A": "loss", "C": "tie"}[second]
    return yours_first if yours_first == yours_second else "inconsistent"


def pairwise_summary(outcomes: list[str | None], resamples: int = 10_000, seed: int = 123) -> dict:
    """Win, tie and loss rates, the position flip rate and a paired interval.

    Rates are shares of the pairs with a verdict in both orders. A win or loss counts
    only when both orders agree; a pair whose winner changes with the order counts as
    a flip (the position flip rate), and as neither win nor loss. The interval is for
    the mean of +1 (win), -1 (loss), 0 (otherwise): above 0, your answers won more.
    """
    judged = [o for o in outcomes if o is not None]
    n = len(judged)
    counts = {k: judged.count(k) for k in ("win", "tie", "loss", "inconsistent")}
    summary = {
        "pairs_judged": n,
        "pairs_unreadable": len(outcomes) - n,
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "flips": counts["inconsistent"],
        "win_rate": counts["win"] / n if n else None,
        "tie_rate": counts["tie"] / n if n else None,
        "loss_rate": counts["loss"] / n if n else None,
        "position_flip_rate": counts["inconsistent"] / n if n else None,
        "sign_test_p": sign_test(counts["win"], counts["loss"]),
        "win_minus_loss": None,
    }
    if n >= 2:
        values = [{"win": 1, "loss": -1}.get(o, 0) for o in judged]
        summary["win_minus_loss"] = paired_interval(values, resamples, seed)
    return summary
