"""Exercises 7.3 and 7.4 end to end: the course run on a served dataset with LoRA.

`run_course.py` runs notebooks 01 to 08 in fresh kernels, as an instructor would, with
the offline model, a dataset fetched from a local HTTP server by URL
(COURSE_DATASET with COURSE_DATA_LIMIT) and LoRA fine-tuning (COURSE_FINETUNE=lora).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from http_fixtures import FileServer, no_proxy  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def served_entries(n: int) -> list[dict]:
    """`n` distinct entries in Stanford Alpaca's format; every third has an input."""
    return [
        {
            "instruction": f"Add {i} and {i + 1}." if i % 3 == 0 else f"Spell the number {i}.",
            "input": f"{i}, {i + 1}" if i % 3 == 0 else "",
            "output": f"{2 * i + 1}." if i % 3 == 0 else f"The number {i}.",
        }
        for i in range(n)
    ]


def test_the_course_runs_on_a_served_dataset_with_lora(tmp_path, no_proxy):  # noqa: F811
    artifacts = tmp_path / "artifacts"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("COURSE_") or key == "COURSE_JUDGE_RUNS"
    }
    env["COURSE_MODELS_DIR"] = str(tmp_path / "gpt2")
    data = json.dumps(served_entries(300)).encode("utf-8")
    with FileServer({"/data/class.json": data}) as server:
        url = server.url + "/data/class.json"
        result = subprocess.run(
            [
                sys.executable,
                "run_course.py",
                "--offline",
                "--dataset",
                url,
                "--data-limit",
                "150",
                "--finetune",
                "lora",
                "--epochs",
                "1",
                "--artifacts",
                str(artifacts),
                "--only",
                "01,02,03,04,05,06,07,08",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the artifacts carry the dataset's tag and the method, beside no book-named ones
    logs = list(artifacts.glob("*-training-log.json"))
    assert len(logs) == 1 and logs[0].name.startswith("offlinetiny-class-")
    assert "-n150-lora-" in logs[0].name
    stem = logs[0].name.removesuffix("-training-log.json")
    config = json.loads(logs[0].read_text(encoding="utf-8"))["config"]
    assert config["finetune"] == "lora"
    assert (artifacts / f"{stem}-sft.pth").exists()
    assert not (artifacts / "split.json").exists()
    split = json.loads(next(artifacts.glob("split-class-*-n150.json")).read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [127, 8, 15]
    responses = json.loads(
        (artifacts / f"{stem}-instruction-data-with-response.json").read_text(encoding="utf-8")
    )
    assert len(responses) == 15
    assert [e["instruction"] for e in responses] == [e["instruction"] for e in split["test"]]
    assert all(isinstance(e["model_response"], str) for e in responses)
    assert "08_qualitative_evaluation.ipynb" in result.stdout
