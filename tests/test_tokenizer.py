"""The GPT-2 tokenizer built from the shipped files, with no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import helpers

ROOT = Path(__file__).resolve().parent.parent


def test_endoftext_is_50256(tokenizer):
    assert tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert tokenizer.eot_token == 50256
    assert tokenizer.n_vocab == 50257
    assert tokenizer.decode([50256]) == "<|endoftext|>"


def test_alpaca_preamble_ids(tokenizer):
    # the book's figure 7.6 value
    ids = tokenizer.encode("Below is an instruction that describes a task.")
    assert ids == [21106, 318, 281, 12064, 326, 8477, 257, 4876, 13]


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello, world", [15496, 11, 995]),
        ("Hello, I am", [15496, 11, 314, 716]),  # book chapter 4
        ("Every effort moves you", [6109, 3626, 6100, 345]),  # book chapter 5
        ("Every day holds a", [6109, 1110, 6622, 257]),  # book chapter 4
        ("\n\n### Response:\n", [198, 198, 21017, 18261, 25, 198]),
    ],
)
def test_known_gpt2_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's table that spells every byte as a printable character in encoder.json."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def test_every_token_matches_encoder_json(tokenizer):
    encoder = json.loads((ROOT / "gpt2-tokenizer" / "encoder.json").read_text(encoding="utf-8"))
    spell = _byte_to_unicode()
    assert len(encoder) == 50257
    for token, token_id in encoder.items():
        if token_id == 50256:
            assert token == "<|endoftext|>"
            continue
        as_bytes = tokenizer.decode_single_token_bytes(token_id)
        assert "".join(spell[b] for b in as_bytes) == token, token_id


@pytest.mark.parametrize("index", [0, 1, 50, 500, 934, 999, 1099])
@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_round_trip_on_dataset_entries(tokenizer, data, index, style):
    entry = data[index]
    text = helpers.format_input(entry, style) + helpers.format_response(entry, style)
    ids = tokenizer.encode(text)
    assert all(0 <= i < 50256 for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_text_needs_permission(tokenizer):
    # like tiktoken's own GPT-2 encoding: text that spells a special token is refused
    # unless allowed, so a dataset entry cannot inject <|endoftext|> by accident
    with pytest.raises(ValueError):
        tokenizer.encode("a <|endoftext|> b")


def test_text_to_token_ids_and_back(tokenizer):
    ids = helpers.text_to_token_ids("Hello, world<|endoftext|>", tokenizer)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[15496, 11, 995, 50256]]
    assert helpers.token_ids_to_text(ids, tokenizer) == "Hello, world<|endoftext|>"
    assert helpers.token_ids_to_text(ids[0], tokenizer) == "Hello, world<|endoftext|>"


def test_tokenizer_from_a_checkpoint_folder(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))  # fresh cache
    # a GPT-2 download carries the same two files: they build the same tokenizer
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes((ROOT / "gpt2-tokenizer" / name).read_bytes())
    other = helpers.get_tokenizer(tmp_path)
    text = "Instruction fine-tuning, step by step: 1,100 entries."
    assert other.encode(text) == tokenizer.encode(text)


def test_damaged_tokenizer_file_is_refused(tmp_path, monkeypatch):
    # a cache of our own: tiktoken checks the sums when it fills a cache
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "encoder.json").write_bytes((ROOT / "gpt2-tokenizer" / "encoder.json").read_bytes())
    merges = (ROOT / "gpt2-tokenizer" / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    del merges[1000]  # one merge rule lost
    (tmp_path / "vocab.bpe").write_text("\n".join(merges), encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.bpe"):
        helpers.get_tokenizer(tmp_path)
