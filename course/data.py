"""The dataset files: download with a checksum, validation that names the entry, the split.

`helpers.download_and_load_file` is the book's listing 7.1. `load_instruction_data`
does the same job for the course: the download resumes and is checked against its
SHA-256, and a damaged or malformed file says which entry is wrong and what to do.
The split is saved with a fingerprint of the data, so that later notebooks notice
when the dataset has changed since.
"""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path
from typing import Any

import helpers
from course import artifacts, settings

DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)
DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
DATA_FILE = settings.ROOT / "instruction-data.json"


class DatasetError(ValueError):
    """The instruction dataset file is not what the course expects."""


def validate_instruction_data(data: Any, source: str) -> list[dict]:
    """Check that `data` is a list of entries with string instruction/input/output."""
    if not isinstance(data, list):
        raise DatasetError(
            f"{source}: expected a JSON list of entries, got a JSON {type(data).__name__}. "
            "Delete the file and run the cell again to download a fresh copy."
        )
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DatasetError(
                f"{source}: entry {index} is of type {type(entry).__name__}, not an object "
                'with "instruction", "input" and "output". Fix or remove that entry.'
            )
        for field in ("instruction", "input", "output"):
            if field not in entry:
                raise DatasetError(
                    f'{source}: entry {index} has no "{field}" field. '
                    f'Every entry needs "instruction", "input" (may be "") and "output".'
                )
            if not isinstance(entry[field], str):
                raise DatasetError(
                    f'{source}: entry {index}, field "{field}" is of type '
                    f"{type(entry[field]).__name__}, not a string. Fix that entry."
                )
    return data


def load_instruction_data(
    file_path: str | Path = DATA_FILE, url: str = DATA_URL, expected_sha256: str | None = None
) -> list[dict]:
    """Download the dataset when `file_path` is missing, then load and validate it.

    A download from the book's DATA_URL must match DATA_SHA256 (pass `expected_sha256`
    to check a copy from elsewhere). An interrupted download continues where it
    stopped when the cell runs again.
    """
    from course import weights  # the robust downloader

    file_path = Path(file_path)
    if not file_path.exists():
        if expected_sha256 is None and url == DATA_URL:
            expected_sha256 = DATA_SHA256
        try:
            weights.download_file(
                url, file_path, show_progress=False, expected_sha256=expected_sha256
            )
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            raise ConnectionError(
                f"Could not download {url}: {weights.describe_network_error(exc, url)}\n"
                f"Run the cell again (it resumes), or download the file by hand and save "
                f"it as {file_path}."
            ) from exc
        except ValueError as exc:  # the checksum did not match
            raise DatasetError(str(exc)) from None
    try:
        text = file_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{file_path}: byte {exc.start} is not UTF-8 text: the file is damaged. Delete "
            "it and run the cell again to download it anew."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{file_path}: not valid JSON ({exc.msg}: line {exc.lineno}, column "
            f"{exc.colno}). Delete the file and run the cell again to download it anew."
        ) from None
    return validate_instruction_data(data, str(file_path))


def data_fingerprint(data: list[dict]) -> str:
    """A SHA-256 of the entries' content, to tell later whether the dataset changed."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def save_split(data: list[dict], path: str | Path | None = None) -> dict:
    """Split `data` the book's way and save the three parts with the data's fingerprint."""
    train_data, val_data, test_data = helpers.split_data(data)
    split = {
        "source_fingerprint": data_fingerprint(data),
        "train": train_data,
        "val": val_data,
        "test": test_data,
    }
    artifacts.write_json(path or artifacts.split_path(), split)
    return split


def load_split(
    path: str | Path | None = None, data_file: str | Path | None = None
) -> tuple[list[dict], list[dict], list[dict]]:
    """Notebook 01's split; stops when it is missing or the dataset changed since."""
    path = Path(path or artifacts.split_path())
    notebook = artifacts.WRITTEN_BY["split"]
    split = artifacts.read_json(path, notebook)
    if not isinstance(split, dict) or not all(k in split for k in ("train", "val", "test")):
        raise artifacts.ArtifactError(
            f"{path} is not a split written by notebook {notebook}: run it again."
        )
    data_file = Path(data_file or DATA_FILE)
    if data_file.exists():
        try:
            current = data_fingerprint(load_instruction_data(data_file))
        except DatasetError as exc:
            raise DatasetError(
                f"{exc}\n(It was readable when notebook {notebook} made the split.)"
            ) from None
        if current != split.get("source_fingerprint"):
            raise RuntimeError(
                f"{data_file.name} has changed since the split in {path} was made. "
                f"Run notebook {notebook} again to redo the split."
            )
    return split["train"], split["val"], split["test"]
