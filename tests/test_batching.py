"""InstructionDataset and custom_collate_fn: padding, -100 targets, masking, devices."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import helpers

ROOT = Path(__file__).resolve().parent.parent
PAD = 50256

# the book's toy batch (section 7.3)
TOY_BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
BOOK_INPUTS = [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
BOOK_TARGETS = [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]


def test_book_toy_batch():
    inputs, targets = helpers.custom_collate_fn(TOY_BATCH)
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.tolist() == BOOK_INPUTS
    assert targets.tolist() == BOOK_TARGETS


def test_collate_does_not_change_the_batch():
    batch = [list(seq) for seq in TOY_BATCH]
    helpers.custom_collate_fn(batch)
    assert batch == TOY_BATCH


def test_allowed_max_length_truncates():
    inputs, targets = helpers.custom_collate_fn(TOY_BATCH, allowed_max_length=3)
    assert inputs.tolist() == [row[:3] for row in BOOK_INPUTS]
    assert targets.tolist() == [row[:3] for row in BOOK_TARGETS]
    # longer than the batch: nothing is cut
    inputs, targets = helpers.custom_collate_fn(TOY_BATCH, allowed_max_length=1024)
    assert inputs.tolist() == BOOK_INPUTS and targets.tolist() == BOOK_TARGETS


def test_ignore_index_placement():
    batch = [[11, 12, 13, 14, 15, 16, 17], [21], [31, 32, 33, 34, 35, 36, 37]]
    _, targets = helpers.custom_collate_fn(batch)
    assert targets.shape == (3, 7)
    for seq, row in zip(batch, targets.tolist(), strict=True):
        n = len(seq)
        # the sequence shifted by one, then exactly one end-of-text, then -100
        assert row[: n - 1] == seq[1:]
        assert row[n - 1] == PAD
        assert row[n:] == [-100] * (7 - n)


def test_custom_pad_and_ignore_index():
    inputs, targets = helpers.custom_collate_fn([[1, 2, 3], [4]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert targets.tolist() == [[2, 3, 0], [0, -1, -1]]


def test_loss_ignores_minus_100():
    # cross_entropy's default ignore_index is -100: those positions count for nothing
    logits = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    full = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([1, 2]))
    masked = torch.nn.functional.cross_entropy(logits[0], torch.tensor([1, 2, -100]))
    assert torch.allclose(full, masked)


def test_device_argument():
    inputs, targets = helpers.custom_collate_fn(TOY_BATCH, device="meta")
    assert inputs.device.type == targets.device.type == "meta"
    assert inputs.shape == targets.shape == (3, 5)
    inputs, targets = helpers.custom_collate_fn(TOY_BATCH, device=torch.device("cpu"))
    assert inputs.device.type == "cpu" and inputs.tolist() == BOOK_INPUTS


def test_instruction_dataset_items(tokenizer, data):
    entries = data[:4]
    dataset = helpers.InstructionDataset(entries, tokenizer)
    assert len(dataset) == 4
    for i, entry in enumerate(entries):
        text = helpers.format_input(entry) + helpers.format_response(entry)
        assert dataset[i] == tokenizer.encode(text)
    phi3 = helpers.InstructionDataset(entries, tokenizer, style="phi3")
    assert tokenizer.decode(phi3[0]).startswith("<|user|>\n")


def test_instruction_dataset_instruction_lengths(tokenizer, data):
    entries = data[:4]
    dataset = helpers.InstructionDataset(entries, tokenizer, with_instruction_length=True)
    for i, entry in enumerate(entries):
        # the book's order (its solution to exercise 7.2): the length first
        instruction_length, ids = dataset[i]
        assert instruction_length == len(tokenizer.encode(helpers.format_input(entry)))
        assert dataset.instruction_lengths[i] == instruction_length
        assert ids is dataset.encoded_texts[i]
        # the prompt's tokens are the first tokens of the whole text
        assert tokenizer.decode(ids[:instruction_length]) == helpers.format_input(entry)
        assert tokenizer.decode(ids[instruction_length:]) == helpers.format_response(entry)
    plain = helpers.InstructionDataset(entries, tokenizer)
    assert plain[0] == dataset[0][1]
    assert plain.instruction_lengths == dataset.instruction_lengths


def test_instruction_masking(tokenizer, data):
    entries = data[:3]
    dataset = helpers.InstructionDataset(entries, tokenizer, with_instruction_length=True)
    batch = [dataset[i] for i in range(len(dataset))]
    inputs, targets = helpers.custom_collate_fn(batch, mask_instructions=True)
    unmasked_inputs, unmasked_targets = helpers.custom_collate_fn([ids for _, ids in batch])
    assert inputs.tolist() == unmasked_inputs.tolist()

    width = inputs.shape[1]
    for row, (instruction_length, ids) in enumerate(batch):
        n = len(ids)
        expected = (
            [-100] * (instruction_length - 1)  # targets that are prompt tokens
            + ids[instruction_length:]  # the response, from its first token
            + [PAD]  # the end-of-text the model must learn
            + [-100] * (width - n)  # padding
        )
        assert targets[row].tolist() == expected
        # the first response token is predicted from the prompt's last token
        assert targets[row, instruction_length - 1].item() == ids[instruction_length]
        assert unmasked_targets[row, : n - 1].tolist() == ids[1:]


def test_instruction_masking_by_hand():
    # prompt of 3 tokens [1, 2, 3], response [4, 5]
    batch = [(3, [1, 2, 3, 4, 5]), (2, [6, 7, 8])]
    inputs, targets = helpers.custom_collate_fn(batch, mask_instructions=True)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, PAD, PAD]]
    assert targets.tolist() == [[-100, -100, 4, 5, PAD], [-100, 8, PAD, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long
    assert batch == [(3, [1, 2, 3, 4, 5]), (2, [6, 7, 8])]  # the dataset's lists stay as they are


def test_instruction_masking_when_the_longest_row_is_not_the_first():
    inputs, targets = helpers.custom_collate_fn(
        [(2, [6, 7, 8]), (3, [1, 2, 3, 4, 5])], mask_instructions=True
    )
    assert inputs.tolist() == [[6, 7, 8, PAD, PAD], [1, 2, 3, 4, 5]]
    assert targets.tolist() == [[-100, 8, PAD, -100, -100], [-100, -100, 4, 5, PAD]]


def test_masking_with_truncation():
    _, targets = helpers.custom_collate_fn(
        [(3, [1, 2, 3, 4, 5])], mask_instructions=True, allowed_max_length=3
    )
    assert targets.tolist() == [[-100, -100, 4]]


def test_masking_needs_instruction_lengths(tokenizer, data):
    with pytest.raises(ValueError, match="with_instruction_length=True"):
        helpers.custom_collate_fn(TOY_BATCH, mask_instructions=True)
    dataset = helpers.InstructionDataset(data[:2], tokenizer)
    with pytest.raises(ValueError, match="InstructionDataset"):
        helpers.custom_collate_fn([dataset[0], dataset[1]], mask_instructions=True)


def test_data_loader_with_partial(tokenizer, data):
    dataset = helpers.InstructionDataset(data[:5], tokenizer, with_instruction_length=True)
    collate = partial(helpers.custom_collate_fn, mask_instructions=True, allowed_max_length=1024)
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 3
    for inputs, targets in batches:
        assert inputs.shape == targets.shape
        assert (targets[:, 0] == -100).all()  # every prompt is longer than one token
    assert [inputs.shape[0] for inputs, _ in batches] == [2, 2, 1]
    # without masking, tuples are accepted too and give the unmasked targets
    _, ids = dataset[0]
    _, plain_targets = helpers.custom_collate_fn([dataset[0]])
    assert plain_targets[0].tolist() == ids[1:] + [PAD]
