"""No run overwrites another: every setting that changes what notebook 05 trains names the run.

Exercise 7.1 runs the course again with Phi-3 prompts, exercise 7.2 with masked
instructions. Both runs must keep their own weights, logs, responses and scores, while
the book's settings keep the book's names. The DPO model records the SFT weights it was
made from, and using it after notebook 05 trained again stops with a message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from course import artifacts, responses, settings

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["baseline", "sft", "checkpoint", "training-log", "responses", "dpo", "dpo-log"]
MEDIUM = "gpt2-medium (355M)"


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    for name in ("COURSE_PROMPT_STYLE", "COURSE_MASK_INSTRUCTIONS", "COURSE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("COURSE_DATASET", "COURSE_DATA_LIMIT", "COURSE_FINETUNE", "COURSE_STAGE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_the_book_settings_keep_the_book_names(folder):
    stem = artifacts.run_stem(MEDIUM)
    assert stem == "gpt2-medium355M"
    assert artifacts.path_for("sft", stem).name == "gpt2-medium355M-sft.pth"
    assert artifacts.path_for("responses", stem).name == (
        "gpt2-medium355M-instruction-data-with-response.json"
    )
    assert artifacts.scores_path(stem, "llama3").name == "gpt2-medium355M-scores-llama3.json"


def test_each_setting_of_notebook_05_adds_its_own_part(folder, monkeypatch):
    assert artifacts.run_stem(MEDIUM, prompt_style="phi3") == "gpt2-medium355M-phi3"
    assert artifacts.run_stem(MEDIUM, mask_instructions=True) == "gpt2-medium355M-masked"
    assert (
        artifacts.run_stem(MEDIUM, "alpaca", "lora", "phi3", True)
        == "gpt2-medium355M-alpaca-lora-phi3-masked"
    )
    # the settings are read when not given, as notebooks 04-11 and run_course.py use it
    monkeypatch.setenv("COURSE_PROMPT_STYLE", "phi3")
    monkeypatch.setenv("COURSE_MASK_INSTRUCTIONS", "true")
    assert artifacts.run_stem(MEDIUM) == "gpt2-medium355M-phi3-masked"
    # every artifact of every variant has a name of its own
    variants = artifacts.run_variants(MEDIUM)
    names = [artifacts.path_for(kind, stem) for stem in variants.values() for kind in KINDS]
    names += [artifacts.scores_path(stem, "llama3") for stem in variants.values()]
    assert len(set(names)) == len(names) == 4 * (len(KINDS) + 1)


def finetune(folder: Path, *extra: str) -> None:
    env = {
        **os.environ,
        "COURSE_ARTIFACTS": str(folder),
        "COURSE_MODELS_DIR": str(folder / "gpt2"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for name in ("COURSE_PROMPT_STYLE", "COURSE_MASK_INSTRUCTIONS", "COURSE_FINETUNE"):
        env.pop(name, None)
    process = subprocess.run(
        [sys.executable, "-m", "course.finetune", "--offline", "--epochs", "1"]
        + ["--data-limit", "40", "--batch-size", "8", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]


def test_a_phi3_run_after_the_default_run_leaves_both_intact(folder, monkeypatch):
    monkeypatch.setenv("COURSE_DATA_LIMIT", "40")
    monkeypatch.setenv("COURSE_MODEL", "offline")
    finetune(folder)
    default = artifacts.training_run()
    assert default["stem"] == "offlinetiny-book-n40"
    kept = {
        path: artifacts.sha256_of_file(path)
        for path in (
            artifacts.path_for("sft", default["stem"]),
            artifacts.path_for("training-log", default["stem"]),
        )
    }

    finetune(folder, "--prompt-style", "phi3")
    for path, digest in kept.items():  # the first run's files are untouched
        assert artifacts.sha256_of_file(path) == digest, f"{path.name} was overwritten"
    phi3_log = artifacts.read_training_log("offlinetiny-book-n40-phi3")
    assert phi3_log["config"]["prompt_style"] == "phi3"
    assert artifacts.read_training_log(default["stem"])["config"]["prompt_style"] == "alpaca"

    # notebooks 06-09 follow the run the settings name; the book's is the default
    assert artifacts.training_run()["stem"] == "offlinetiny-book-n40"
    monkeypatch.setenv("COURSE_PROMPT_STYLE", "phi3")
    phi3 = artifacts.training_run()
    assert (phi3["stem"], phi3["prompt_style"]) == ("offlinetiny-book-n40-phi3", "phi3")

    # with only the phi3 run there and no setting, that is the run to follow
    monkeypatch.delenv("COURSE_PROMPT_STYLE")
    artifacts.path_for("training-log", default["stem"]).unlink()
    assert artifacts.training_run()["stem"] == "offlinetiny-book-n40-phi3"
    # with two runs, neither of them the book's, the message names both and their settings
    (folder / "offlinetiny-book-n40-phi3-masked-training-log.json").write_text(
        json.dumps(phi3_log), encoding="utf-8"
    )
    with pytest.raises(settings.SettingError, match="COURSE_MASK_INSTRUCTIONS=true"):
        artifacts.training_run()


def write_sft_run(stem: str, style: str, weights: bytes) -> Path:
    sft = artifacts.path_for("sft", stem)
    sft.write_bytes(weights)
    artifacts.write_training_log(
        stem,
        {
            "model": settings.OFFLINE_MODEL,
            "config": {"prompt_style": style, "mask_instructions": False},
            "initial_losses": {},
            "duration_minutes": 0.1,
            **{key: [1.0] for key in artifacts.TRAINING_LOG_SERIES},
        },
    )
    return sft


def test_a_dpo_model_of_older_sft_weights_is_refused(folder):
    stem = artifacts.run_stem(settings.OFFLINE_MODEL)
    sft = write_sft_run(stem, "alpaca", b"the SFT weights notebook 10 started from")
    artifacts.path_for("dpo", stem).write_bytes(b"the DPO weights")
    artifacts.write_json(
        artifacts.path_for("dpo-log", stem),
        {
            "reference": sft.name,
            "sft_sha256": artifacts.sha256_of_file(sft),
            "config": {"prompt_style": "alpaca"},
        },
    )
    assert responses.weights_path(stem, "dpo") == artifacts.path_for("dpo", stem)

    sft.write_bytes(b"notebook 05 trained again")
    with pytest.raises(artifacts.ArtifactError, match="10_preference_tuning_with_dpo") as info:
        responses.weights_path(stem, "dpo")
    assert "notebook 05 trained again" in str(info.value)
    assert responses.weights_path(stem, "sft") == sft  # notebook 05's model is still usable


def test_a_dpo_model_of_other_prompts_is_refused(folder):
    stem = artifacts.run_stem(settings.OFFLINE_MODEL)
    sft = write_sft_run(stem, "alpaca", b"weights")
    artifacts.path_for("dpo", stem).write_bytes(b"the DPO weights")
    artifacts.write_json(
        artifacts.path_for("dpo-log", stem),
        {"sft_sha256": artifacts.sha256_of_file(sft), "config": {"prompt_style": "phi3"}},
    )
    with pytest.raises(artifacts.ArtifactError, match="'phi3' prompts"):
        responses.weights_path(stem, "dpo")
