"""Repeated judge runs and paired comparisons of two response sets (course/scores.py).

The expected numbers are computed here from the stand-in's documented rule, not read
back from helpers: a judge prompt scores round(100 x F1) of the words (lower case,
letters and digits) shared by the response and the correct output; with noise n the
score moves by int(sha256(f"{seed}\\n{prompt}"), 16) % (2n + 1) - n, kept within 0-100.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from ollama_standin import MODELS, OllamaStandIn, judge_reply

import helpers
from course import judge, scores, settings
from course.artifacts import ArtifactError

TASKS = [
    {key: entry[key] for key in ("instruction", "input", "output")}
    for entry in json.loads((settings.ROOT / "book-reference-responses.json").read_text())
]
WORDS = [re.findall(r"\w+", task["output"].lower()) for task in TASKS]


def full_set() -> list[dict]:
    """Set A: every correct output verbatim (F1 = 1, score 100)."""
    return [{**task, "model_response": task["output"]} for task in TASKS]


def half_set() -> list[dict]:
    """Set B: the first half (rounded down) of each output's words."""
    return [
        {**task, "model_response": " ".join(words[: len(words) // 2])}
        for task, words in zip(TASKS, WORDS, strict=True)
    ]


def half_set_scores() -> list[int]:
    """Set B's exact scores: the response's k = n // 2 words are the first k of the n
    reference words, so precision 1, recall k / n and F1 = 2k / (n + k)."""
    return [round(100 * 2 * (len(w) // 2) / (len(w) + len(w) // 2)) for w in WORDS]


def noisy(score: int, seed: int, prompt: str, noise: int = 3) -> int:
    offset = int(hashlib.sha256(f"{seed}\n{prompt}".encode()).hexdigest(), 16) % (2 * noise + 1)
    return min(100, max(0, score + offset - noise))


def score_runs(entries, path, runs) -> None:
    for run in runs:
        judge.generate_model_scores(entries, "model_response", scores_path=path, run=run)


def synthetic_record(runs: list[list[int | None]], outputs=None, digest="d" * 64) -> dict:
    """A scores record in generate_model_scores' format, with the scores given."""
    outputs = outputs or [f"answer {i}" for i in range(len(runs[0]))]
    return {
        "judge": {
            "model": "llama3",
            "tag": "llama3:latest",
            "digest": digest,
            "details": {},
            "options": dict(judge.JUDGE_OPTIONS),
        },
        "json_key": "model_response",
        "runs": [
            {
                "run": r,
                "ollama_version": "0.1.0",
                "options": judge.judge_options(r),
                "entries": [
                    {
                        "index": i,
                        "prompt": helpers.judge_prompt(
                            {
                                "instruction": "Say it.",
                                "input": "",
                                "output": output,
                                "model_response": "x",
                            },
                            "model_response",
                        ),
                        "reply": str(score),
                        "score": score,
                    }
                    for i, (score, output) in enumerate(zip(run_scores, outputs, strict=True))
                ],
                "summary": scores.score_summary(run_scores),
            }
            for r, run_scores in enumerate(runs)
        ],
    }


# -- the stand-in's noise ------------------------------------------------------------


def test_standin_noise_is_reproducible_bounded_and_seeded():
    prompts = [helpers.judge_prompt(e, "model_response") for e in half_set()]
    exact = [int(judge_reply(p)) for p in prompts]
    assert exact == half_set_scores()
    assert [int(judge_reply(p, 123, noise=0)) for p in prompts] == exact
    run_123 = [int(judge_reply(p, 123, noise=3)) for p in prompts]
    assert run_123 == [int(judge_reply(p, 123, noise=3)) for p in prompts]  # reproducible
    assert run_123 == [noisy(s, 123, p) for s, p in zip(exact, prompts, strict=True)]
    assert all(abs(a - b) <= 3 for a, b in zip(run_123, exact, strict=True))
    run_124 = [int(judge_reply(p, 124, noise=3)) for p in prompts]
    assert sum(a != b for a, b in zip(run_123, run_124, strict=True)) > 50  # seeds differ
    full_prompts = [helpers.judge_prompt(e, "model_response") for e in full_set()]
    assert max(int(judge_reply(p, 123, noise=3)) for p in full_prompts) == 100  # kept <= 100


# -- a known paired difference -------------------------------------------------------


def test_known_paired_difference_through_the_standin(ollama_standin, tmp_path):
    score_runs(full_set(), tmp_path / "a.json", [0])
    score_runs(half_set(), tmp_path / "b.json", [0])
    expected_b = half_set_scores()
    expected_d = np.array([100 - s for s in expected_b], dtype=float)
    assert scores.load_scores(tmp_path / "a.json") == [100] * len(TASKS)
    assert scores.load_scores(tmp_path / "b.json") == expected_b

    result = scores.compare_scores(tmp_path / "a.json", tmp_path / "b.json", names=("A", "B"))
    assert result["entries"] == result["paired"] == 110 and result["left_out"] == 0
    assert [d["difference"] for d in result["differences"]] == expected_d.tolist()
    assert result["average_a"] == 100
    assert result["average_b"] == pytest.approx(np.mean(expected_b))
    assert result["mean_difference"] == pytest.approx(expected_d.mean())
    assert result["mean_difference"] == pytest.approx(39.7182, abs=1e-4)
    se = expected_d.std(ddof=1) / np.sqrt(110)
    assert result["standard_error"] == pytest.approx(se)
    low, high = result["ci95"]
    assert 0 < low < expected_d.mean() < high
    # a bootstrap 95% interval is close to mean ± 1.98 standard errors for 110 entries
    assert (high - low) / (2 * 1.98 * se) == pytest.approx(1, abs=0.1)
    assert result["a_higher"] == int((expected_d > 0).sum()) and result["b_higher"] == 0
    assert result["ties"] == int((expected_d == 0).sum())
    assert result["within_noise"] is False
    assert result["verdict"].startswith("A scores 39.72 points higher than B")
    assert result["run_spread"] == [None, None] and result["judge_noise"] is None
    assert any("one run" in note for note in result["notes"])
    assert not any("this small" in note for note in result["notes"])
    report = scores.format_comparison(result)
    assert "+39.72 points" in report and result["verdict"] in report

    reverse = scores.compare_scores(tmp_path / "b.json", tmp_path / "a.json", names=("B", "A"))
    assert reverse["mean_difference"] == pytest.approx(-expected_d.mean())
    assert reverse["ci95"][1] < 0 and reverse["b_higher"] == result["a_higher"]
    assert reverse["verdict"].startswith("A scores 39.72 points higher than B")


def test_identical_sets_differ_by_zero_within_noise(ollama_standin, tmp_path):
    # two runs of the course that produced the same responses, scored separately
    score_runs(half_set(), tmp_path / "first.json", [0])
    score_runs(half_set(), tmp_path / "second.json", [0])
    result = scores.compare_scores(tmp_path / "first.json", tmp_path / "second.json")
    assert result["mean_difference"] == 0 and result["standard_error"] == 0
    assert result["ci95"] == [0, 0]
    assert result["ties"] == 110 and result["within_noise"] is True
    assert result["verdict"].startswith("Within the judge's noise: the 95% interval")


# -- repeated runs ----------------------------------------------------------------------


def expected_noisy_table(entries: list[dict], seeds) -> np.ndarray:
    prompts = [helpers.judge_prompt(e, "model_response") for e in entries]
    exact = [round(100 * 2 * (len(w) // 2) / (len(w) + len(w) // 2)) for w in WORDS]
    if entries[0]["model_response"] == entries[0]["output"]:
        exact = [100] * len(entries)
    return np.array(
        [[noisy(s, seed, p) for s, p in zip(exact, prompts, strict=True)] for seed in seeds],
        dtype=float,
    )


def test_repeated_runs_record_mean_std_and_the_entries_that_vary(ollama_standin, tmp_path):
    ollama_standin.set_noise(3)
    path = tmp_path / "b.json"
    score_runs(half_set(), path, [0, 1, 2])
    expected = expected_noisy_table(half_set(), [123, 124, 125])
    assert [body["options"]["seed"] for body in ollama_standin.chat_requests] == (
        [123] * 110 + [124] * 110 + [125] * 110
    )
    np.testing.assert_array_equal(scores.score_table(path), expected)

    record = json.loads(path.read_text())
    assert [run["options"]["seed"] for run in record["runs"]] == [123, 124, 125]
    assert record["judge"]["options"]["seed"] == 123  # the base seed; run r adds r
    averages = expected.mean(axis=1)
    assert record["summary"]["runs"] == 3
    assert record["summary"]["run_averages"] == pytest.approx(averages.tolist())
    assert record["summary"]["average"] == pytest.approx(averages.mean())
    assert record["summary"]["std"] == pytest.approx(averages.std(ddof=1))
    assert record["summary"]["std"] > 0

    summary = scores.summarize_runs(path, top=5)
    assert summary["runs"] == 3 and summary["seeds"] == [123, 124, 125]
    assert summary["mean"] == pytest.approx(averages.mean())
    assert summary["std"] == pytest.approx(averages.std(ddof=1))
    assert summary["spread"] == pytest.approx(averages.max() - averages.min())
    ranges = expected.max(axis=0) - expected.min(axis=0)
    assert summary["entries_that_vary"] == int((ranges > 0).sum())
    top = sorted(range(110), key=lambda i: (-ranges[i], i))[:5]
    assert [item["index"] for item in summary["most_varying"]] == top
    assert summary["most_varying"][0]["scores"] == expected[:, top[0]].astype(int).tolist()
    assert summary["most_varying"][0]["range"] == ranges.max() <= 6
    text = scores.format_run_summary(summary, "set B")
    assert f"average {averages.mean():.2f} ± {averages.std(ddof=1):.2f}" in text
    assert "set B: 3 runs (seeds [123, 124, 125])" in text


def test_one_run_says_the_spread_is_not_measured(ollama_standin, tmp_path):
    score_runs(half_set(), tmp_path / "b.json", [0])
    summary = scores.summarize_runs(tmp_path / "b.json")
    assert summary["runs"] == 1 and summary["std"] is None and summary["spread"] is None
    assert summary["mean"] == pytest.approx(np.mean(half_set_scores()))
    assert summary["most_varying"] == []
    assert "One run cannot show" in scores.format_run_summary(summary)


def test_known_difference_with_a_noisy_judge(ollama_standin, tmp_path):
    ollama_standin.set_noise(3)
    score_runs(full_set(), tmp_path / "a.json", [0, 1, 2])
    score_runs(half_set(), tmp_path / "b.json", [0, 1, 2])
    table_a = expected_noisy_table(full_set(), [123, 124, 125])
    table_b = expected_noisy_table(half_set(), [123, 124, 125])
    expected_d = table_a.mean(axis=0) - table_b.mean(axis=0)  # per entry, over the runs

    result = scores.compare_scores(tmp_path / "a.json", tmp_path / "b.json")
    assert result["runs"] == [3, 3]
    assert result["mean_difference"] == pytest.approx(expected_d.mean())
    # near the exact 39.72: the noise averages out, but set A's 100s can only move down
    # (offsets -3..0 of the seven), which lowers A by about 6/7 of a point
    assert result["mean_difference"] == pytest.approx(39.72 - 6 / 7, abs=0.5)
    spreads = [t.mean(axis=1).max() - t.mean(axis=1).min() for t in (table_a, table_b)]
    assert result["run_spread"] == pytest.approx(spreads)
    assert result["judge_noise"] == pytest.approx(max(spreads))
    assert result["ci95"][0] > 0 and result["within_noise"] is False
    assert (
        "exceeds the" in result["verdict"] and "spread between repeated runs" in result["verdict"]
    )


def test_the_same_responses_scored_again_are_within_noise(ollama_standin, tmp_path):
    ollama_standin.set_noise(3)
    score_runs(half_set(), tmp_path / "first.json", [0, 1, 2])
    score_runs(half_set(), tmp_path / "second.json", [3, 4, 5])  # other seeds: 126-128
    first = expected_noisy_table(half_set(), [123, 124, 125])
    second = expected_noisy_table(half_set(), [126, 127, 128])
    expected_d = first.mean(axis=0) - second.mean(axis=0)
    assert expected_d.any()  # the judge's noise makes them differ a little

    result = scores.compare_scores(tmp_path / "first.json", tmp_path / "second.json")
    assert result["mean_difference"] == pytest.approx(expected_d.mean())
    assert abs(result["mean_difference"]) < 0.5
    assert result["ci95"][0] <= 0 <= result["ci95"][1]
    assert result["within_noise"] is True
    assert result["verdict"].startswith("Within the judge's noise")


def test_difference_below_the_run_spread_is_within_noise():
    base = [40, 55, 60, 70, 35, 80, 65, 50, 45, 75]
    a = synthetic_record([[s + 3 for s in base], [s - 1 for s in base]])  # runs 4 apart
    b = synthetic_record([base, base])
    result = scores.compare_scores(a, b)
    assert result["mean_difference"] == pytest.approx(1.0)  # every entry +1
    assert result["ci95"] == pytest.approx([1.0, 1.0])  # the interval excludes 0 ...
    assert result["run_spread"] == pytest.approx([4.0, 0.0])
    assert result["within_noise"] is True  # ... but the runs of A moved by 4 points
    assert "no larger than the 4.00 points" in result["verdict"]

    c = synthetic_record([[s + 6 for s in base], [s + 4 for s in base]])  # +5, runs 2 apart
    beyond = scores.compare_scores(c, b, names=("C", "B"))
    assert beyond["mean_difference"] == pytest.approx(5.0)
    assert beyond["within_noise"] is False
    assert beyond["verdict"].startswith("C scores 5.00 points higher than B")


def test_unreadable_scores_are_left_out_of_the_pairs(ollama_standin, tmp_path):
    score_runs(full_set(), tmp_path / "a.json", [0])
    ollama_standin.set_fault("no-number", times=2)
    score_runs(half_set(), tmp_path / "b.json", [0])
    result = scores.compare_scores(tmp_path / "a.json", tmp_path / "b.json")
    assert result["paired"] == 108 and result["left_out"] == 2
    assert [d["index"] for d in result["differences"]][:2] == [2, 3]
    expected_d = [100 - s for s in half_set_scores()[2:]]
    assert result["mean_difference"] == pytest.approx(np.mean(expected_d))
    assert "2 without a readable score left out" in scores.format_comparison(result)


# -- what the scores file records --------------------------------------------------------


def test_scores_file_records_the_judge_and_each_run(ollama_standin, tmp_path):
    path = tmp_path / "b.json"
    score_runs(half_set()[:5], path, [0, 1])
    record = json.loads(path.read_text())
    assert record["judge"] == {
        "model": "llama3",
        "tag": "llama3:latest",
        "digest": MODELS[0]["digest"],
        "details": MODELS[0]["details"],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    for run, seed in zip(record["runs"], (123, 124), strict=True):
        assert run["ollama_version"] == ollama_standin.version == "0.0.0"
        assert run["options"] == {"seed": seed, "temperature": 0, "num_ctx": 2048}
    assert judge.judge_options(2) == {"seed": 125, "temperature": 0, "num_ctx": 2048}
    assert judge.judge_options(1, {"temperature": 0.7}) == {"temperature": 0.7}


def test_a_run_asked_of_another_ollama_version_is_scored_anew(tmp_path, monkeypatch, capsys):
    path = tmp_path / "b.json"
    with OllamaStandIn() as old:
        monkeypatch.setenv("OLLAMA_HOST", old.url)
        score_runs(half_set()[:4], path, [0])
    with OllamaStandIn(version="0.1.0") as new:
        monkeypatch.setenv("OLLAMA_HOST", new.url)
        score_runs(half_set()[:4], path, [0])
        assert len(new.chat_requests) == 4  # nothing reused from the other version
    assert "scoring it anew" in capsys.readouterr().out
    (run,) = json.loads(path.read_text())["runs"]
    assert run["ollama_version"] == "0.1.0"


# -- refusals ------------------------------------------------------------------------------


def test_a_run_of_older_responses_is_refused(ollama_standin, tmp_path):
    path = tmp_path / "b.json"
    entries = half_set()[:4]
    score_runs(entries, path, [0, 1])
    older = json.loads(path.read_text())
    entries[2]["model_response"] = "something else"  # notebook 07 ran again
    score_runs(entries, path, [0])
    # scoring the new responses sets the older run aside: it is not averaged with them
    assert scores.summarize_runs(path)["runs"] == 1
    # a file that still mixes them (written by an earlier version) is refused
    mixed = json.loads(path.read_text())
    mixed["runs"].append(older["runs"][1])
    with pytest.raises(ValueError, match=r"Run 1 scored other responses.*run=1"):
        scores.summarize_runs(mixed)
    score_runs(entries, path, [1])
    assert scores.summarize_runs(path)["runs"] == 2


def test_an_unfinished_run_is_refused():
    record = synthetic_record([[50, 60, 70], [50, 60, 70]])
    del record["runs"][1]["summary"]
    with pytest.raises(ValueError, match=r"Run 1 is unfinished.*run=1"):
        scores.summarize_runs(record)


def test_comparing_other_test_entries_is_refused():
    a = synthetic_record([[50, 60, 70]], outputs=["x", "y", "z"])
    with pytest.raises(ValueError, match="Entry 1 is another test entry"):
        scores.compare_scores(a, synthetic_record([[50, 60, 70]], outputs=["x", "w", "z"]))
    with pytest.raises(ValueError, match="has 3 scored entries and B 2"):
        scores.compare_scores(a, synthetic_record([[50, 60]], outputs=["x", "y"]))


def test_comparing_files_of_different_judges_says_so():
    a = synthetic_record([[50, 60, 70, 80]], digest="a" * 64)
    b = synthetic_record([[50, 60, 70, 80]], digest="b" * 64)
    result = scores.compare_scores(a, b)
    assert any("different judge models" in note for note in result["notes"])


def test_missing_scores_file_names_the_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="09_scoring_the_responses"):
        scores.compare_scores(tmp_path / "none.json", tmp_path / "none.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ArtifactError, match="holds no scoring runs"):
        scores.summarize_runs(tmp_path / "empty.json")
