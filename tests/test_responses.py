"""Notebook 07's extraction (course.responses): the book's responses, batched and resumable."""

import pytest
import torch

import helpers
from course import artifacts, responses, settings


@pytest.fixture
def model():
    torch.manual_seed(123)
    return helpers.GPTModel(settings.model_config("offline")).eval()


@pytest.fixture
def weights_file(tmp_path, model):
    path = tmp_path / "offlinetiny-sft.pth"
    torch.save(model.state_dict(), path)
    return path


def book_loop(model, entries, tokenizer, max_new_tokens):
    """Listing 7.9, one entry at a time with helpers.generate."""
    out = []
    for entry in entries:
        input_text = helpers.format_input(entry)
        token_ids = helpers.generate(
            model,
            helpers.text_to_token_ids(input_text, tokenizer),
            max_new_tokens=max_new_tokens,
            context_size=model.pos_emb.weight.shape[0],
            eos_id=50256,
        )
        generated = helpers.token_ids_to_text(token_ids, tokenizer)
        out.append(generated[len(input_text) :].replace("### Response:", "").strip())
    return out


class CountingBatches:
    """Wraps generate_batch: counts the prompts it is asked for, can fail on call n."""

    def __init__(self, fail_on_call=None):
        self.prompts, self.calls, self.fail_on_call = 0, 0, fail_on_call
        self.real = responses.generate_batch

    def __call__(self, model, prompts, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        self.prompts += len(prompts)
        return self.real(model, prompts, *args, **kwargs)


def test_batched_responses_equal_the_book_loop(model, weights_file, tokenizer, data, tmp_path):
    entries = data[:5]
    got = responses.generate_responses(
        model, entries, tokenizer, "alpaca", 6, 2, tmp_path / "progress.json", weights_file
    )
    assert got == book_loop(model, entries, tokenizer, 6)


def test_interrupted_extraction_resumes_with_the_same_responses(
    model, weights_file, tokenizer, data, tmp_path, monkeypatch
):
    entries, progress = data[:5], tmp_path / "progress.json"
    expected = responses.generate_responses(
        model, entries, tokenizer, "alpaca", 4, 2, tmp_path / "whole.json", weights_file
    )
    interrupted = CountingBatches(fail_on_call=2)  # stops after the first batch
    monkeypatch.setattr(responses, "generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        responses.generate_responses(
            model, entries, tokenizer, "alpaca", 4, 2, progress, weights_file
        )
    assert len(artifacts.read_json(progress)["responses"]) == 2

    resumed = CountingBatches()
    monkeypatch.setattr(responses, "generate_batch", resumed)
    got = responses.generate_responses(
        model, entries, tokenizer, "alpaca", 4, 2, progress, weights_file
    )
    assert resumed.prompts == 3  # only the entries not yet answered
    assert got == expected


def test_progress_of_other_weights_or_settings_is_not_reused(
    model, weights_file, tokenizer, data, tmp_path, monkeypatch, capsys
):
    entries, progress = data[:3], tmp_path / "progress.json"
    responses.generate_responses(model, entries, tokenizer, "alpaca", 3, 8, progress, weights_file)
    counting = CountingBatches()
    monkeypatch.setattr(responses, "generate_batch", counting)

    responses.generate_responses(model, entries, tokenizer, "alpaca", 3, 8, progress, weights_file)
    assert counting.prompts == 0  # everything reused

    responses.generate_responses(model, entries, tokenizer, "alpaca", 2, 8, progress, weights_file)
    assert counting.prompts == 3
    assert "other max_new_tokens" in capsys.readouterr().out

    with torch.no_grad():
        model.out_head.weight.add_(0.01)  # notebook 05 ran again: other weights
    torch.save(model.state_dict(), weights_file)
    responses.generate_responses(model, entries, tokenizer, "alpaca", 2, 8, progress, weights_file)
    assert counting.prompts == 6
    assert "other weights_sha256" in capsys.readouterr().out


def test_stage_names_and_a_missing_dpo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    assert responses.responses_stem("gpt2-medium355M", "sft") == "gpt2-medium355M"
    assert responses.responses_stem("gpt2-medium355M", "dpo") == "gpt2-medium355M-dpo"
    with pytest.raises(settings.SettingError, match="COURSE_STAGE"):
        responses.responses_stem("gpt2-medium355M", "ppo")
    with pytest.raises(artifacts.MissingArtifact, match="10_preference_tuning_with_dpo"):
        responses.weights_path("gpt2-medium355M", "dpo")
    with pytest.raises(FileNotFoundError, match="05_instruction_finetuning"):
        responses.weights_path("gpt2-medium355M", "sft")


def test_a_responses_file_without_responses_names_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    path = artifacts.path_for("responses", "offlinetiny")
    artifacts.write_json(path, [{"instruction": "x", "input": "", "output": "y"}])
    with pytest.raises(artifacts.ArtifactError, match=path.name):
        responses.load_responses("offlinetiny")
    path.write_text('[{"instruction": "x", "model_respo', encoding="utf-8")
    with pytest.raises(artifacts.ArtifactError, match="cut off"):
        responses.load_responses("offlinetiny")


def test_with_responses_keeps_the_books_format(data):
    entries = data[:2]
    out = responses.with_responses(entries, ["a", "b"])
    assert [list(e) for e in out] == [["instruction", "input", "output", "model_response"]] * 2
    assert entries[0].get("model_response") is None  # the test entries are not changed
    with pytest.raises(ValueError, match="1 responses for 2 test entries"):
        responses.with_responses(entries, ["a"])
