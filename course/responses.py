"""Notebook 07's machinery: which fine-tuned model to load, and extraction that gives the
book's greedy responses many prompts at a time, kept in a progress file that an
interrupted run continues from (reused only for the same entries, weights, style and limit).
"""

from __future__ import annotations

from pathlib import Path

import torch

import helpers
from course import artifacts, settings
from course.data import data_fingerprint
from course.speed import generate_batch
from course.weights import load_model_weights

# which notebook writes the weights of each stage
STAGE_NOTEBOOK = {"sft": artifacts.WRITTEN_BY["sft"], "dpo": artifacts.WRITTEN_BY["dpo"]}


def responses_stem(stem: str, stage: str = "sft") -> str:
    """The stem of a stage's responses and scores: the run's stem, with "-dpo" for DPO."""
    if stage not in STAGE_NOTEBOOK:
        raise settings.SettingError(f"COURSE_STAGE={stage!r}: use 'sft' or 'dpo'.")
    return stem if stage == "sft" else f"{stem}-dpo"


def weights_path(stem: str, stage: str = "sft") -> Path:
    """The fine-tuned weights of a stage: notebook 05's `-sft.pth` or notebook 10's `-dpo.pth`.

    Stops with a message naming the notebook that writes them when they are missing,
    and, for DPO, when notebook 10's model was made from other SFT weights or prompts
    than notebook 05's run has now (`course.dpo.check_dpo_model`).
    """
    responses_stem(stem, stage)  # checks the stage
    path = artifacts.path_for(stage, stem)
    if not path.exists():
        extra = (
            " (COURSE_STAGE=dpo extracts the DPO model of the bonus notebook 10; unset "
            "COURSE_STAGE to use notebook 05's model)"
            if stage == "dpo"
            else ""
        )
        raise artifacts.MissingArtifact(
            f"{path.name} was not found in {path.parent}. It is written by notebook "
            f"{STAGE_NOTEBOOK[stage]}: run that notebook first (with the same COURSE_* "
            f"settings){extra}."
        )
    if stage == "dpo":
        from course.dpo import check_dpo_model

        check_dpo_model(stem)  # stops when notebook 05 trained again since notebook 10 ran
    return path


def load_fine_tuned(
    model_name: str, path: str | Path, device: str | torch.device
) -> helpers.GPTModel:
    """A `helpers.GPTModel` of `model_name`'s size with the weights in `path`, in eval mode."""
    model = helpers.GPTModel(settings.model_config(model_name))
    load_model_weights(model, path)  # names the file and the fix if it is damaged
    return model.to(device).eval()


def made_with(
    test_data: list[dict], path: str | Path, prompt_style: str, max_new_tokens: int
) -> dict:
    """What a set of responses depends on; the progress file is reused only if it matches."""
    path = Path(path)
    return {
        "test_entries_sha256": data_fingerprint(test_data),
        "weights": path.name,
        "weights_sha256": artifacts.sha256_of_file(path),
        "prompt_style": prompt_style,
        "max_new_tokens": max_new_tokens,
    }


def load_progress(progress_path: str | Path, expected: dict) -> dict:
    """The saved progress if it was made with `expected`, else an empty one (and why)."""
    progress_path = Path(progress_path)
    empty = {"made_with": expected, "responses": {}}
    if not progress_path.exists():
        return empty
    saved = artifacts.read_json(progress_path, artifacts.WRITTEN_BY["responses-progress"])
    if not isinstance(saved, dict) or not isinstance(saved.get("responses"), dict):
        print(f"{progress_path.name} is not a progress file of notebook 07: starting over.")
        return empty
    if saved.get("made_with") != expected:
        changed = [
            key for key in expected if (saved.get("made_with") or {}).get(key) != expected[key]
        ]
        print(
            f"{progress_path.name} was made with other {', '.join(changed) or 'settings'}: "
            "starting over."
        )
        return empty
    return saved


def generate_responses(
    model: helpers.GPTModel,
    test_data: list[dict],
    tokenizer,
    prompt_style: str,
    max_new_tokens: int,
    batch_size: int,
    progress_path: str | Path,
    weights: str | Path,
    eos_id: int = 50256,
    show_progress: bool = True,
) -> list[str]:
    """Listing 7.9's responses for every entry of `test_data`, batched and resumable.

    Each response is what `helpers.generate` + `helpers.extract_response` give for the
    entry alone. After every batch of `batch_size` prompts the responses so far are
    written to `progress_path`; a later call with the same entries, weights (`weights`,
    the file the model was loaded from) and settings generates only the rest.
    Returns the responses in the order of `test_data`.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    context_size = model.pos_emb.weight.shape[0]
    progress = load_progress(
        progress_path, made_with(test_data, weights, prompt_style, max_new_tokens)
    )
    done = progress["responses"]
    todo = [i for i in range(len(test_data)) if str(i) not in done]
    if done:
        print(f"{len(test_data) - len(todo)} responses already made, {len(todo)} to generate")
    with tqdm(
        total=len(test_data),
        initial=len(test_data) - len(todo),
        desc="Responses",
        disable=not show_progress,
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            input_texts = [helpers.format_input(test_data[i], prompt_style) for i in batch]
            prompts = [
                helpers.text_to_token_ids(text, tokenizer)[0].tolist() for text in input_texts
            ]
            new_tokens = generate_batch(
                model, prompts, max_new_tokens, context_size, eos_id=eos_id, batch_size=len(batch)
            )
            for i, text, prompt, new in zip(batch, input_texts, prompts, new_tokens, strict=True):
                generated = tokenizer.decode(prompt + new)
                done[str(i)] = helpers.extract_response(generated, text, prompt_style)
            artifacts.write_json(progress_path, progress)
            bar.update(len(batch))
    return [done[str(i)] for i in range(len(test_data))]


def with_responses(test_data: list[dict], responses: list[str]) -> list[dict]:
    """The book's file format: each test entry with one more key, `model_response`."""
    if len(responses) != len(test_data):
        raise ValueError(f"{len(responses)} responses for {len(test_data)} test entries.")
    return [{**entry, "model_response": r} for entry, r in zip(test_data, responses, strict=True)]


def load_responses(stem: str) -> list[dict]:
    """Notebook 07's responses of run `stem` (a responses stem), checked for `model_response`."""
    path = artifacts.path_for("responses", stem)
    data = artifacts.read_json(path, artifacts.WRITTEN_BY["responses"])
    if not isinstance(data, list) or not all(
        isinstance(e, dict) and isinstance(e.get("model_response"), str) for e in data
    ):
        raise artifacts.ArtifactError(
            f"{path.name} is not notebook 07's responses file (a list of test entries, each "
            "with a model_response). Delete it and run notebook 07_extracting_responses again."
        )
    return data
