"""Judge scores read back: per-run summaries, repeated runs, and a paired comparison of
two models that says whether a difference is more than the judge's noise. Used by
notebook 09, course.judge and run_course.py's summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from course.artifacts import WRITTEN_BY, ArtifactError, read_json


def load_scores(scores_path: str | Path, run: int = 0) -> list[int | None]:
    """Per-entry scores of one run in a scores file (None where the reply was unreadable)."""
    record = read_json(scores_path, WRITTEN_BY["scores"])
    for saved_run in record["runs"]:
        if saved_run["run"] == run:
            return [entry["score"] for entry in saved_run["entries"]]
    runs = [saved_run["run"] for saved_run in record["runs"]]
    raise KeyError(f"{scores_path} has no run {run}; it has runs {runs}")


def score_summary(scores: list[int | None]) -> dict:
    """Average, counts and a histogram (0-9, 10-19, ..., 90-100) of judge scores."""
    readable = [s for s in scores if s is not None]
    histogram = [0] * 10
    for score in readable:
        histogram[min(score // 10, 9)] += 1
    return {
        "entries": len(scores),
        "scored": len(readable),
        "unreadable": len(scores) - len(readable),
        # None, not NaN, when no reply was readable: strict JSON has no NaN
        "average": sum(readable) / len(readable) if readable else None,
        "histogram": histogram,
    }


def prompts_sha256(prompts: list[str]) -> str:
    """The key of the responses a scoring run scored: a SHA-256 of its judge prompts.

    Each prompt holds the test entry and the response, so responses made anew by
    notebook 07 give another key.
    """
    import hashlib
    import json

    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


def responses_key(run: dict) -> str | None:
    """The responses key of a finished scoring run (computed for runs stored without one)."""
    if run.get("responses_sha256"):
        return run["responses_sha256"]
    entries = sorted(run.get("entries", []), key=lambda e: e["index"])
    if "summary" not in run or [e["index"] for e in entries] != list(range(len(entries))):
        return None
    return prompts_sha256([e["prompt"] for e in entries])


def describe_average(summary: dict) -> str:
    """ "average 51.20", or that no reply had a readable score."""
    if summary.get("average") is None:
        return "no reply had a readable score, so there is no average"
    return f"average {summary['average']:.2f}"


def read_scores(scores: str | Path | dict) -> dict:
    """A scores record as `generate_model_scores` writes it: read from its path, or as given."""
    if isinstance(scores, dict):
        record, source = scores, "This scores record"
    else:
        record, source = read_json(scores, WRITTEN_BY["scores"]), Path(scores).name
    if not isinstance(record, dict) or not record.get("runs"):
        raise ArtifactError(
            f"{source} holds no scoring runs: it is not a scores file written by "
            "course.judge.generate_model_scores (notebook 09_scoring_the_responses)."
        )
    return record


def scored_entries(run: dict) -> list[dict]:
    """The entries of one finished scoring run, in the order of the responses."""
    entries = sorted(run["entries"], key=lambda e: e["index"])
    if "summary" not in run or [e["index"] for e in entries] != list(range(len(entries))):
        raise ValueError(
            f"Run {run['run']} is unfinished: run generate_model_scores(..., run={run['run']}) "
            "again to complete it."
        )
    return entries


def score_table(scores: str | Path | dict) -> np.ndarray:
    """The scores of every run as an array [runs, entries], NaN where none was readable.

    All runs must have scored the same responses: a run left from before notebook 07 ran
    again is refused, with a message saying how to score it anew.
    """
    record = read_scores(scores)
    first = [e["prompt"] for e in scored_entries(record["runs"][0])]
    rows = []
    for run in record["runs"]:
        entries = scored_entries(run)
        if [e["prompt"] for e in entries] != first:
            raise ValueError(
                f"Run {run['run']} scored other responses than run {record['runs'][0]['run']} "
                "(did notebook 07 run again since?). Score it again: "
                f"generate_model_scores(..., run={run['run']})."
            )
        rows.append([np.nan if e["score"] is None else float(e["score"]) for e in entries])
    return np.array(rows, dtype=float)


def run_averages(table: np.ndarray) -> list[float]:
    """The average readable score of each run (each row of a `score_table`)."""
    averages = []
    for row in table:
        readable = row[~np.isnan(row)]
        averages.append(float(readable.mean()) if len(readable) else float("nan"))
    return averages


def summarize_runs(scores: str | Path | dict, top: int = 5) -> dict:
    """Mean ± standard deviation of the run averages, and the entries that vary most.

    The standard deviation is the sample one (n - 1) of the per-run averages: how much
    the average moves when the same responses are scored again. With one run it, and
    the spread (largest minus smallest run average), are None.
    """
    record = read_scores(scores)
    table = score_table(record)
    averages = run_averages(table)
    run_means = [a for a in averages if not np.isnan(a)]
    ranges = []
    for column in table.T:
        readable = column[~np.isnan(column)]
        ranges.append(float(readable.max() - readable.min()) if len(readable) > 1 else 0.0)
    order = sorted(range(len(ranges)), key=lambda i: (-ranges[i], i))
    most_varying = [
        {
            "index": i,
            "scores": [None if np.isnan(s) else int(s) for s in table[:, i]],
            "range": ranges[i],
        }
        for i in order[:top]
        if ranges[i] > 0
    ]
    several = len(run_means) > 1
    return {
        "runs": len(averages),
        "seeds": [run.get("options", {}).get("seed") for run in record["runs"]],
        "run_averages": [None if np.isnan(a) else a for a in averages],
        # None when no run had a readable reply
        "mean": float(np.mean(run_means)) if run_means else None,
        "std": float(np.std(run_means, ddof=1)) if several else None,
        "spread": max(run_means) - min(run_means) if several else None,
        "entries": table.shape[1],
        "entries_that_vary": sum(r > 0 for r in ranges),
        "most_varying": most_varying,
    }


def format_run_summary(summary: dict, name: str = "scores") -> str:
    """A few lines for a person: the average over runs and the entries that vary most."""
    if summary["mean"] is None:
        return (
            f"{name}: {summary['runs']} run{'s' if summary['runs'] != 1 else ''}, no reply had "
            "a readable score, so there is no average. Read the judge's replies in the scores "
            "file: a judge that does not answer with a number needs another model "
            "(COURSE_JUDGE_MODEL) or a look at the server."
        )
    if summary["runs"] == 1:
        return (
            f"{name}: 1 run, average {summary['mean']:.2f}\n"
            "  One run cannot show how much the judge's average moves: score again "
            "(COURSE_JUDGE_RUNS=3) to see."
        )
    averages = ", ".join("-" if a is None else f"{a:.2f}" for a in summary["run_averages"])
    lines = [
        f"{name}: {summary['runs']} runs (seeds {summary['seeds']}), average "
        f"{summary['mean']:.2f} ± {summary['std']:.2f} (mean ± standard deviation of the run "
        f"averages {averages})",
        f"  entries whose score changed between runs: {summary['entries_that_vary']} "
        f"of {summary['entries']}",
    ]
    for item in summary["most_varying"]:
        scores = ", ".join("-" if s is None else str(s) for s in item["scores"])
        lines.append(f"  entry {item['index']:3}: {scores} (range {item['range']:.0f})")
    return "\n".join(lines)


def judged_task(prompt: str) -> str:
    """The part of a judge prompt that names the test entry (without the response)."""
    return prompt.split(", score the model response `")[0]


def compare_scores(
    scores_a: str | Path | dict,
    scores_b: str | Path | dict,
    names: tuple[str, str] = ("A", "B"),
    resamples: int = 10_000,
    seed: int = 123,
) -> dict:
    """Compare two scored response sets entry by entry (paired): is the difference real?

    Both files must score responses to the same test entries. Each entry's score is its
    average over its file's runs, and the difference d = A - B is taken per entry, so how
    hard an entry is cancels out. Reports the mean of d, its standard error
    (sd(d) / sqrt(n)) and a 95% bootstrap interval (the entries resampled `resamples`
    times with a fixed `seed`). The difference is within the judge's noise when that
    interval includes 0, or when it is no larger than the spread of the run averages of
    either file (the same responses scored again).
    """
    record_a, record_b = read_scores(scores_a), read_scores(scores_b)
    table_a, table_b = score_table(record_a), score_table(record_b)
    require_same_entries(record_a, record_b, table_a, table_b, names)
    a, b = entry_means(table_a), entry_means(table_b)
    keep = ~np.isnan(a) & ~np.isnan(b)
    d = a[keep] - b[keep]
    n = len(d)
    if n < 2:
        raise ValueError(f"Only {n} entries have a readable score in both files: too few.")
    mean, std = float(d.mean()), float(d.std(ddof=1))
    low, high = bootstrap_interval(d, resamples, seed)
    spreads = [run_spread(table) for table in (table_a, table_b)]
    measured = [s for s in spreads if s is not None]
    judge_noise = max(measured) if measured else None
    within_noise = low <= 0 <= high or (judge_noise is not None and abs(mean) <= judge_noise)
    return {
        "names": list(names),
        "entries": len(a),
        "paired": n,
        "left_out": int(len(a) - n),
        "runs": [table_a.shape[0], table_b.shape[0]],
        "average_a": float(a[keep].mean()),
        "average_b": float(b[keep].mean()),
        "mean_difference": mean,
        "std_difference": std,
        "standard_error": std / np.sqrt(n),
        "ci95": [low, high],
        "bootstrap": {"resamples": resamples, "seed": seed},
        "run_spread": spreads,
        "judge_noise": judge_noise,
        "within_noise": bool(within_noise),
        "a_higher": int((d > 0).sum()),
        "b_higher": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "differences": [
            {"index": int(i), "a": float(a[i]), "b": float(b[i]), "difference": float(a[i] - b[i])}
            for i in np.flatnonzero(keep)
        ],
        "verdict": comparison_verdict(mean, (low, high), judge_noise, names),
        "notes": comparison_notes(record_a, record_b, judge_noise),
    }


def require_same_entries(
    record_a: dict, record_b: dict, table_a: np.ndarray, table_b: np.ndarray, names
) -> None:
    """Stop unless both records scored responses to the same test entries, in order."""
    name_a, name_b = names
    if table_a.shape[1] != table_b.shape[1]:
        raise ValueError(
            f"{name_a} has {table_a.shape[1]} scored entries and {name_b} {table_b.shape[1]}: "
            "a paired comparison needs scores of responses to the same test entries."
        )
    tasks_a = [judged_task(e["prompt"]) for e in scored_entries(record_a["runs"][0])]
    tasks_b = [judged_task(e["prompt"]) for e in scored_entries(record_b["runs"][0])]
    for i, (task_a, task_b) in enumerate(zip(tasks_a, tasks_b, strict=True)):
        if task_a != task_b:
            raise ValueError(
                f"Entry {i} is another test entry in {name_a} than in {name_b}: compare "
                "responses to the same test set (the same split of notebook 01)."
            )


def entry_means(table: np.ndarray) -> np.ndarray:
    """Each entry's average readable score over the runs (NaN where no run had one)."""
    counts = (~np.isnan(table)).sum(axis=0)
    return np.where(counts > 0, np.nansum(table, axis=0) / np.maximum(counts, 1), np.nan)


def bootstrap_interval(d: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean of `d` (its entries resampled)."""
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    return low, high


def run_spread(table: np.ndarray) -> float | None:
    """Largest minus smallest run average (None with one run: not measured)."""
    averages = run_averages(table)
    return max(averages) - min(averages) if len(averages) > 1 else None


def comparison_verdict(
    mean: float, interval: tuple[float, float], judge_noise: float | None, names
) -> str:
    """One sentence: is the difference within the judge's noise, or who scores higher."""
    name_a, name_b = names
    low, high = interval
    shown = f"[{low:+.2f}, {high:+.2f}]"
    if low <= 0 <= high:
        return (
            f"Within the judge's noise: the 95% interval of the difference, {shown}, "
            f"includes 0, so these scores do not show that {name_a} and {name_b} differ."
        )
    if judge_noise is not None and abs(mean) <= judge_noise:
        return (
            f"Within the judge's noise: the difference, {mean:+.2f} points, is no larger than "
            f"the {judge_noise:.2f} points by which repeated runs of the same responses moved "
            "the average."
        )
    higher, lower = (name_a, name_b) if mean > 0 else (name_b, name_a)
    return (
        f"{higher} scores {abs(mean):.2f} points higher than {lower}: the 95% interval of "
        f"the difference, {shown}, excludes 0"
        + (
            f" and the difference exceeds the {judge_noise:.2f}-point spread between repeated runs."
            if judge_noise is not None
            else "."
        )
    )


def comparison_notes(record_a: dict, record_b: dict, judge_noise: float | None) -> list[str]:
    """What limits the comparison: no repeated runs, other judges, other Ollama versions."""
    notes = []
    if judge_noise is None:
        notes.append(
            "Each file holds one run, so how much the judge's average moves when the same "
            "responses are scored again is not measured: score more runs "
            "(COURSE_JUDGE_RUNS=3) to measure it."
        )
    judge_a, judge_b = record_a["judge"], record_b["judge"]
    for key, what in (("digest", "judge models"), ("options", "judge options")):
        if judge_a.get(key) != judge_b.get(key):
            notes.append(
                f"The two files were scored with different {what} ({judge_a.get(key)} and "
                f"{judge_b.get(key)}): the difference mixes the responses with the judges."
            )
    versions = {r.get("ollama_version") for r in record_a["runs"] + record_b["runs"]}
    if len(versions) > 1:
        notes.append(f"The runs used different Ollama versions: {sorted(map(str, versions))}.")
    return notes


def format_comparison(comparison: dict) -> str:
    """The report of `compare_scores` for a person, ending with its verdict."""
    c = comparison
    name_a, name_b = c["names"]
    runs_a, runs_b = (f"{k} run" if k == 1 else f"{k} runs" for k in c["runs"])
    spreads = [
        f"{name}: not measured (1 run)" if spread is None else f"{name}: {spread:.2f} points"
        for name, spread in zip(c["names"], c["run_spread"], strict=True)
    ]
    lines = [
        f"Paired comparison of {name_a} (A) and {name_b} (B), entry by entry",
        f"  entries scored in both   {c['paired']} of {c['entries']}"
        + (f" ({c['left_out']} without a readable score left out)" if c["left_out"] else ""),
        f"  average score            A {c['average_a']:.2f} ({runs_a}), "
        f"B {c['average_b']:.2f} ({runs_b})",
        f"  difference A - B         {c['mean_difference']:+.2f} points, "
        f"standard error {c['standard_error']:.2f}",
        f"  95% interval             [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] (bootstrap: "
        f"{c['bootstrap']['resamples']:,} resamples of the entries, seed {c['bootstrap']['seed']})",
        f"  entries                  A higher {c['a_higher']}, B higher {c['b_higher']}, "
        f"tied {c['ties']}",
        f"  run-to-run spread        {'; '.join(spreads)}",
        "",
        c["verdict"],
    ]
    lines += [f"Note: {note}" for note in c["notes"]]
    return "\n".join(lines)
