"""The shipped data files, the dataset download and validation, prompts and the split."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from http_fixtures import FileServer, closed_port_url, no_proxy  # noqa: F401

import course.data
import helpers
from course.artifacts import sha256_of_file, split_path, write_atomic, write_json
from course.data import (
    DATA_SHA256,
    DatasetError,
    data_fingerprint,
    load_instruction_data,
    load_split,
    save_split,
)

ROOT = Path(__file__).resolve().parent.parent

# SHA-256 sums of the files as published (dataset and book responses: the book's
# companion repository; tokenizer: OpenAI's GPT-2 release, the sums tiktoken checks)
EXPECTED_SHA256 = {
    "instruction-data.json": "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    "book-reference-responses.json": "aced320504c77c98d957316eb9f3460945256226c36b5e9752bf7d49585eb943",
    "gpt2-tokenizer/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2-tokenizer/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    # two real judges' scores of the same responses (the book's bonus material, notebook 12)
    "judge-scores/eval-example-data.json": "90e9ceb4f1184f6b307fd76d0dd1e8b15bd3da200b1fc69ee897107394a775e0",
    "judge-scores/gpt4-model-1-response.json": "705f24bf17878d5e29c5cb2daeae00a64a1688756192478f91f41bf1eff85689",
    "judge-scores/gpt4-model-2-response.json": "2b10d2abdf1f71f4f8057c012be2bf6c777823adbadb597f4d1699e06129db5a",
    "judge-scores/llama3-8b-model-1-response.json": "a6005211110bf3d9e30dbdb17638a1918004bc490c85b0b3520798a31d7fa5a4",
    "judge-scores/llama3-8b-model-2-response.json": "18e501530c56085aca3e6c2d7da39edc03fd85fe205f17a65ab1a400c6d61125",
}

ENTRY_WITH_INPUT = {
    "instruction": "Identify the correct spelling of the following word.",
    "input": "Ocassion",
    "output": "The correct spelling is 'Occasion.'",
}
ENTRY_WITHOUT_INPUT = {
    "instruction": "What is an antonym of 'complicated'?",
    "input": "",
    "output": "An antonym of 'complicated' is 'simple'.",
}
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


@pytest.fixture(scope="module")
def data() -> list[dict]:
    return json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))


# --- the shipped files ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_SHA256))
def test_shipped_file_sha256(name):
    path = ROOT / name
    assert path.is_file(), f"{name} is missing from the repository"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED_SHA256[name]
    assert sha256_of_file(path) == EXPECTED_SHA256[name]


def test_helpers_knows_the_dataset_sum():
    assert DATA_SHA256 == EXPECTED_SHA256["instruction-data.json"]


def test_notebook_12_checks_the_judge_scores_against_the_same_sums():
    from course.judge_stats import JUDGE_SCORES_SHA256

    shipped = {k: v for k, v in EXPECTED_SHA256.items() if k.startswith("judge-scores/")}
    assert {f"judge-scores/{k}": v for k, v in JUDGE_SCORES_SHA256.items()} == shipped


def test_book_reference_responses_are_the_test_split(data):
    reference = json.loads((ROOT / "book-reference-responses.json").read_text(encoding="utf-8"))
    _, _, test_data = helpers.split_data(data)
    assert len(reference) == len(test_data) == 110
    for ref, entry in zip(reference, test_data, strict=True):
        assert {k: ref[k] for k in ("instruction", "input", "output")} == entry
        assert isinstance(ref["model_response"], str) and ref["model_response"]


# --- download_and_load_file -------------------------------------------------


def test_download_only_when_missing(tmp_path, no_proxy):  # noqa: F811
    source = (ROOT / "instruction-data.json").read_bytes()
    with FileServer({"/data/instruction-data.json": source}) as server:
        url = server.url + "/data/instruction-data.json"
        target = tmp_path / "sub" / "instruction-data.json"

        first = load_instruction_data(target, url)
        assert len(server.requests) == 1
        assert target.read_bytes() == source
        assert len(first) == 1100

        second = load_instruction_data(target, url)
        assert len(server.requests) == 1, "the file exists: nothing should be downloaded"
        assert second == first
    assert sorted(p.name for p in target.parent.iterdir()) == ["instruction-data.json"]


def test_download_cut_off_keeps_no_half_file_and_resumes(tmp_path, no_proxy):  # noqa: F811
    source = (ROOT / "instruction-data.json").read_bytes()
    path = "/instruction-data.json"
    with FileServer({path: source}, cut_once=(path,)) as server:
        target = tmp_path / "instruction-data.json"
        with pytest.raises(ConnectionError, match="instruction-data.json"):
            load_instruction_data(target, server.url + path)
        assert server.requests_for(path)[0]["status"] == 200
        # the bytes so far wait under another name: the dataset file itself is absent
        assert not target.exists(), "a cut-off download must not leave a half dataset file"
        assert [p.name for p in tmp_path.iterdir()] == ["instruction-data.json.part"]

        # the next attempt asks only for the rest
        data = load_instruction_data(target, server.url + path)
        second = server.requests_for(path)[1]
    assert second["range"] == f"bytes={len(source) // 2}-" and second["status"] == 206
    assert target.read_bytes() == source
    assert [p.name for p in tmp_path.iterdir()] == ["instruction-data.json"]
    assert len(data) == 1100


def test_download_checks_the_sha256(tmp_path, monkeypatch, no_proxy):  # noqa: F811
    source = (ROOT / "instruction-data.json").read_bytes()
    tampered = source.replace(b"Occasion", b"Ocasion", 1)
    with FileServer({"/good.json": source, "/bad.json": tampered}) as server:
        target = tmp_path / "instruction-data.json"
        with pytest.raises(DatasetError, match="SHA-256"):
            load_instruction_data(
                target, server.url + "/bad.json", EXPECTED_SHA256["instruction-data.json"]
            )
        assert list(tmp_path.iterdir()) == [], "a file with the wrong checksum is deleted"

        # the book's URL is checked against DATA_SHA256 without being asked
        monkeypatch.setattr(course.data, "DATA_URL", server.url + "/bad.json")
        with pytest.raises(DatasetError, match="SHA-256"):
            load_instruction_data(target, course.data.DATA_URL)
        assert not target.exists()

        data = load_instruction_data(
            target, server.url + "/good.json", EXPECTED_SHA256["instruction-data.json"]
        )
    assert len(data) == 1100 and target.read_bytes() == source


def test_download_http_error_is_clear(tmp_path, no_proxy):  # noqa: F811
    target = tmp_path / "instruction-data.json"
    with FileServer({}) as server:
        url = server.url + "/missing.json"
        with pytest.raises(ConnectionError) as info:
            load_instruction_data(target, url)
    message = str(info.value)
    assert url in message and "404" in message and str(target) in message
    assert not target.exists()


def test_download_refused_connection_is_clear(tmp_path, no_proxy):  # noqa: F811
    target = tmp_path / "instruction-data.json"
    url = closed_port_url() + "/instruction-data.json"
    with pytest.raises(ConnectionError, match="Could not download"):
        load_instruction_data(target, url)
    assert not target.exists()


MALFORMED = {
    "not_json": ('[{"instruction": "a", "input": "", "output": "b"},', ["not valid JSON"]),
    "not_a_list": ('{"instruction": "a", "input": "", "output": "b"}', ["JSON list", "dict"]),
    "entry_not_object": (
        '[{"instruction": "a", "input": "", "output": "b"}, "just text"]',
        ["entry 1", "str", "not an object"],
    ),
    "missing_field": (
        '[{"instruction": "a", "input": "", "output": "b"},'
        ' {"instruction": "a", "input": "", "output": "b"},'
        ' {"instruction": "a", "output": "b"}]',
        ["entry 2", '"input"'],
    ),
    "non_string_field": (
        '[{"instruction": "a", "input": "", "output": 5}]',
        ["entry 0", '"output"', "int", "not a string"],
    ),
    "null_field": (
        '[{"instruction": "a", "input": "", "output": "b"},'
        ' {"instruction": null, "input": "", "output": "b"}]',
        ["entry 1", '"instruction"', "NoneType"],
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_dataset_file(tmp_path, case):
    text, expected_parts = MALFORMED[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text, encoding="utf-8")
    # the file exists, so nothing is downloaded: a dead URL proves it
    with pytest.raises(DatasetError) as info:
        load_instruction_data(path, closed_port_url() + "/unused.json")
    message = str(info.value)
    assert str(path) in message, message
    for part in expected_parts:
        assert part in message, message
    assert isinstance(info.value, ValueError)


def test_extra_fields_are_allowed():
    data = load_instruction_data(ROOT / "book-reference-responses.json", "unused")
    assert len(data) == 110


# --- prompts ----------------------------------------------------------------


def test_format_input_alpaca_with_input():
    assert helpers.format_input(ENTRY_WITH_INPUT) == (
        PREAMBLE + "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion"
    )
    assert helpers.format_input(ENTRY_WITH_INPUT, style="alpaca") == helpers.format_input(
        ENTRY_WITH_INPUT
    )


def test_format_input_alpaca_without_input():
    assert helpers.format_input(ENTRY_WITHOUT_INPUT) == (
        PREAMBLE + "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
    )


def test_format_input_phi3():
    assert helpers.format_input(ENTRY_WITH_INPUT, style="phi3") == (
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion"
    )
    assert helpers.format_input(ENTRY_WITHOUT_INPUT, style="phi3") == (
        "<|user|>\nWhat is an antonym of 'complicated'?"
    )


def test_format_response_both_styles():
    assert helpers.format_response(ENTRY_WITH_INPUT) == (
        "\n\n### Response:\nThe correct spelling is 'Occasion.'"
    )
    assert helpers.format_response(ENTRY_WITH_INPUT, style="phi3") == (
        "\n<|assistant|>:\nThe correct spelling is 'Occasion.'"
    )


def test_unknown_prompt_style():
    with pytest.raises(ValueError, match="alpaca"):
        helpers.format_input(ENTRY_WITH_INPUT, style="chatml")
    with pytest.raises(ValueError, match="phi3"):
        helpers.format_response(ENTRY_WITH_INPUT, style="chatml")


# --- the split --------------------------------------------------------------


def test_split_is_the_books(data):
    train_data, val_data, test_data = helpers.split_data(data)
    assert (len(train_data), len(val_data), len(test_data)) == (935, 55, 110)
    # file order, no shuffling: train, then test, then validation
    assert train_data == data[:935]
    assert test_data == data[935:1045]
    assert val_data == data[1045:]


def test_save_and_load_split(tmp_path, data):
    data_file = tmp_path / "instruction-data.json"
    data_file.write_text(json.dumps(data), encoding="utf-8")
    split_file = tmp_path / "artifacts" / "split.json"
    saved = save_split(data, split_file)
    assert saved["source_fingerprint"] == data_fingerprint(data)

    train_data, val_data, test_data = load_split(split_file, data_file=data_file)
    assert (train_data, val_data, test_data) == helpers.split_data(data)


def test_load_split_detects_a_changed_dataset(tmp_path, data):
    data_file = tmp_path / "instruction-data.json"
    data_file.write_text(json.dumps(data), encoding="utf-8")
    split_file = tmp_path / "split.json"
    save_split(data, split_file)

    changed = [dict(entry) for entry in data]
    changed[3]["output"] += " (edited)"
    data_file.write_text(json.dumps(changed), encoding="utf-8")
    with pytest.raises(RuntimeError, match="01_dataset_download_and_formatting"):
        load_split(split_file, data_file=data_file)


def test_fingerprint_ignores_formatting_but_not_content(data):
    reformatted = json.loads(json.dumps(data, indent=4))
    assert data_fingerprint(reformatted) == data_fingerprint(data)
    assert data_fingerprint(data[:-1]) != data_fingerprint(data)


def test_load_split_missing_names_notebook_01(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path / "split.json")
    message = str(info.value)
    assert "01_dataset_download_and_formatting" in message
    assert "split.json" in message


def test_split_path_follows_course_artifacts(tmp_path, monkeypatch, data):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path / "my-artifacts"))
    assert split_path() == tmp_path / "my-artifacts" / "split.json"
    save_split(data)
    assert (tmp_path / "my-artifacts" / "split.json").is_file()
    train_data, _, _ = load_split(data_file=ROOT / "instruction-data.json")
    assert train_data == data[:935]


# --- atomic writes (section 1, used by the dataset code) ----------------------


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out" / "file.json"
    write_json(target, {"a": [1, 2]})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    write_json(target, {"old": True})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes were written
    with pytest.raises(OSError, match="No space left"):
        write_json(target, {"new": True})
    assert json.loads(target.read_text(encoding="utf-8")) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_write_atomic_file_mode_is_like_a_normal_file(tmp_path):
    normal = tmp_path / "normal.txt"
    normal.write_bytes(b"x")
    atomic = tmp_path / "atomic.txt"
    write_atomic(atomic, b"x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(normal).st_mode)
