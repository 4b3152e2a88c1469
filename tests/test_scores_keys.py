"""Scores files: strict JSON when no reply is readable, and runs keyed to their responses.

Each test scores against the stand-in Ollama server on a free loopback port and reads
the scores file from disk, as notebook 09 and run_course.py do.
"""

from __future__ import annotations

import json

from course import judge, scores

ENTRIES = [  # response vs output: word-overlap F1 100, 0 and 0.8 (precision 1, recall 2/3)
    {"instruction": "Name a color.", "input": "", "output": "blue", "model_response": "blue"},
    {"instruction": "Say hi.", "input": "", "output": "hello there", "model_response": "goodbye"},
    {
        "instruction": "Name two fruits.",
        "input": "",
        "output": "apple pear banana",
        "model_response": "apple pear",
    },
]


def strict_json(path):
    """The file as a strict JSON reader reads it: NaN or Infinity is an error."""

    def refuse(constant):
        raise ValueError(f"{path.name} holds {constant}, which strict JSON readers reject")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_no_readable_reply_stores_null_and_says_so(ollama_standin, tmp_path, capsys):
    ollama_standin.set_fault("no-number")  # every reply without a number
    path = tmp_path / "run-scores-llama3.json"
    assert judge.generate_model_scores(ENTRIES, "model_response", scores_path=path) == []
    record = strict_json(path)
    assert record["runs"][0]["summary"]["average"] is None
    assert record["summary"]["average"] is None
    assert "No reply of the judge had a readable score" in capsys.readouterr().out

    summary = scores.summarize_runs(path)
    assert summary["mean"] is None
    text = scores.format_run_summary(summary, "your model")
    assert "nan" not in text.lower()
    assert "no reply had a readable score" in text
    assert "no reply had a readable score" in scores.describe_average(
        scores.score_summary(scores.load_scores(path))
    )


def test_runs_of_other_responses_are_not_averaged(ollama_standin, tmp_path, capsys):
    path = tmp_path / "run-scores-llama3.json"
    for run in (0, 1):
        judge.generate_model_scores(ENTRIES, "model_response", scores_path=path, run=run)
    assert strict_json(path)["summary"]["run_averages"] == [
        (100 + 0 + 80) / 3,
        (100 + 0 + 80) / 3,
    ]

    # notebook 07 runs again: the second response is now right, the scores change
    remade = [dict(e) for e in ENTRIES]
    remade[1]["model_response"] = "hello there"
    judge.generate_model_scores(remade, "model_response", scores_path=path, run=0)
    out = capsys.readouterr().out
    assert "Run 1 in run-scores-llama3.json scored other responses" in out
    assert "COURSE_JUDGE_RUNS" in out

    record = strict_json(path)
    assert [r["run"] for r in record["runs"]] == [0]
    assert record["summary"]["run_averages"] == [(100 + 100 + 80) / 3]
    assert record["summary"]["average"] == (100 + 100 + 80) / 3
    key = record["runs"][0]["responses_sha256"]
    assert key == record["summary"]["responses_sha256"]
    assert key == scores.prompts_sha256(
        [e["prompt"] for e in sorted(record["runs"][0]["entries"], key=lambda e: e["index"])]
    )
    # the runs set aside are kept, in a backup that is never overwritten
    backups = list((tmp_path / "backups").iterdir())
    assert len(backups) == 1
    assert [r["run"] for r in strict_json(backups[0])["runs"]] == [0, 1]
    assert scores.summarize_runs(path)["runs"] == 1


def test_runs_stored_without_a_key_are_keyed_by_their_prompts(ollama_standin, tmp_path):
    path = tmp_path / "run-scores-llama3.json"
    for run in (0, 1):
        judge.generate_model_scores(ENTRIES, "model_response", scores_path=path, run=run)
    record = json.loads(path.read_text())
    for run in record["runs"]:  # as an earlier version of the course wrote it
        del run["responses_sha256"]
    path.write_text(json.dumps(record))
    judge.generate_model_scores(ENTRIES, "model_response", scores_path=path, run=0)
    assert strict_json(path)["summary"]["runs"] == 2  # the same responses: both kept
