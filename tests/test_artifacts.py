"""Damaged artifacts name themselves: the file, what is wrong with it, and the fix.

Each JSON file the notebooks hand on is damaged the way it happens (a copy cut off,
a disk that filled up under an older version, random bytes, an editor's byte-order
mark) and read the way the next notebook reads it. Before, each gave a bare
JSONDecodeError or UnicodeDecodeError with no file name.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from course import artifacts, data, scores, settings
from course.artifacts import ArtifactError, MissingArtifact, path_for, read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
STEM = artifacts.run_stem(settings.OFFLINE_MODEL)  # "offlinetiny"


@pytest.fixture
def artifacts_folder(tmp_path, monkeypatch):
    folder = tmp_path / "artifacts"
    monkeypatch.setenv("COURSE_ARTIFACTS", str(folder))
    monkeypatch.setenv("COURSE_MODEL", "offline")
    for name in ("COURSE_DATASET", "COURSE_DATA_LIMIT", "COURSE_FINETUNE"):
        monkeypatch.delenv(name, raising=False)
    return folder


def cut_in_half(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def training_log() -> dict:
    return {
        "train_losses": [9.1, 8.7],
        "val_losses": [9.2, 8.9],
        "tokens_seen": [512, 1024],
        "config": {"prompt_style": "alpaca", "mask_instructions": False},
    }


def scores_record() -> dict:
    entry = {"index": 0, "prompt": "p", "reply": "50", "score": 50}
    return {"model": "llama3", "runs": [{"run": 0, "entries": [entry]}]}


# (artifact kind, its content, how the next notebook reads it, the notebook that writes it)
READERS = {
    "training-log": (
        training_log(),
        lambda path: artifacts.training_run(),
        "05_instruction_finetuning",
    ),
    "responses": (
        [{"instruction": "i", "input": "", "output": "o", "model_response": "r"}],
        lambda path: read_json(path),
        "07_extracting_responses",
    ),
    "responses-progress": (
        {"done": 1, "responses": ["r"]},
        lambda path: read_json(path),
        "07_extracting_responses",
    ),
    "scores": (scores_record(), lambda path: scores.load_scores(path), "09_scoring_the_responses"),
}


def artifact_path(kind: str) -> Path:
    return artifacts.scores_path(STEM, "llama3") if kind == "scores" else path_for(kind, STEM)


@pytest.mark.parametrize("kind", sorted(READERS))
def test_a_cut_off_artifact_names_the_file_and_the_notebook(artifacts_folder, kind):
    content, read, notebook = READERS[kind]
    path = artifact_path(kind)
    write_json(path, content)
    read(path)  # whole, it reads
    cut_in_half(path)
    with pytest.raises(ArtifactError) as caught:
        read(path)
    message = str(caught.value)
    assert path.name in message
    assert "cut off" in message
    assert f"run notebook {notebook} again" in message


@pytest.mark.parametrize("kind", sorted(READERS))
def test_random_bytes_are_not_utf8(artifacts_folder, kind):
    _, read, notebook = READERS[kind]
    path = artifact_path(kind)
    path.write_bytes(random.Random(kind).randbytes(3000))
    with pytest.raises(ArtifactError) as caught:
        read(path)
    message = str(caught.value)
    assert path.name in message and "not UTF-8" in message and notebook in message


def test_an_empty_file_says_empty(artifacts_folder):
    path = path_for("responses", STEM)
    path.write_bytes(b"")
    with pytest.raises(ArtifactError, match=f"{path.name} is empty.*07_extracting_responses"):
        read_json(path)


def test_a_file_of_zero_bytes_says_so(artifacts_folder):
    path = path_for("training-log", STEM)
    path.write_bytes(bytes(4096))  # what a crash can leave on some file systems
    with pytest.raises(ArtifactError, match="only zero bytes.*05_instruction_finetuning"):
        read_json(path)


def test_a_byte_order_mark_is_fine(artifacts_folder):
    path = path_for("training-log", STEM)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(training_log()).encode("utf-8"))
    assert read_json(path) == training_log()
    assert artifacts.training_run()["prompt_style"] == "alpaca"


def test_a_missing_artifact_names_the_notebook_that_writes_it(artifacts_folder):
    with pytest.raises(MissingArtifact, match="07_extracting_responses: run that notebook first"):
        read_json(path_for("responses", STEM), "07_extracting_responses")
    with pytest.raises(FileNotFoundError, match="09_scoring_the_responses"):
        scores.load_scores(artifacts.scores_path(STEM, "llama3"))


def test_the_writer_of_each_artifact_is_known_from_its_name(artifacts_folder):
    for kind in ("baseline", "training-log", "responses", "responses-progress", "dpo-log"):
        assert artifacts.written_by(path_for(kind, STEM)) == artifacts.WRITTEN_BY[kind]
    assert artifacts.written_by(artifacts.scores_path(STEM, "llama3:8b")) == (
        "09_scoring_the_responses"
    )
    assert artifacts.written_by(artifacts.split_path("book")) == artifacts.WRITTEN_BY["split"]
    assert artifacts.written_by(artifacts.split_path("alpaca-n50")) == artifacts.WRITTEN_BY["split"]
    assert artifacts.written_by("notes.json") is None


# -- the split and the dataset file it was made from --------------------------------


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "instruction-data.json"
    shutil.copy(ROOT / "instruction-data.json", path)
    return path


def test_a_cut_off_split_names_itself(artifacts_folder, data_file):
    data.save_split(data.load_instruction_data(data_file))
    cut_in_half(artifacts.split_path())
    with pytest.raises(ArtifactError) as caught:
        data.load_split(data_file=data_file)
    message = str(caught.value)
    assert "split.json is cut off" in message
    assert "run notebook 01_dataset_download_and_formatting again" in message


def test_a_split_with_a_byte_order_mark_loads(artifacts_folder, data_file):
    data.save_split(data.load_instruction_data(data_file))
    path = artifacts.split_path()
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    train, val, test = data.load_split(data_file=data_file)
    assert (len(train), len(val), len(test)) == (935, 55, 110)


@pytest.mark.parametrize("damage", ["cut off", "random bytes"])
def test_a_dataset_damaged_after_notebook_01_is_named(artifacts_folder, data_file, damage):
    data.save_split(data.load_instruction_data(data_file))
    if damage == "cut off":
        cut_in_half(data_file)
    else:
        data_file.write_bytes(random.Random(1).randbytes(5000))
    with pytest.raises(data.DatasetError) as caught:
        data.load_split(data_file=data_file)
    message = str(caught.value)
    assert str(data_file) in message
    assert ("not valid JSON" if damage == "cut off" else "not UTF-8") in message
    assert "01_dataset_download_and_formatting" in message


def test_scoring_again_over_a_cut_off_scores_file_names_it(artifacts_folder, ollama_standin):
    from course import judge

    path = artifacts.scores_path(STEM, "llama3")
    write_json(path, scores_record())
    cut_in_half(path)
    entries = [{"instruction": "i", "input": "", "output": "o", "model_response": "r"}]
    with pytest.raises(ArtifactError) as caught:
        judge.generate_model_scores(entries, "model_response", "llama3", scores_path=path)
    message = str(caught.value)
    assert path.name in message and "cut off" in message and "09_scoring_the_responses" in message
