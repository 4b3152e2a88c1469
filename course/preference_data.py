"""Notebook 10's preference data: the course's file checked against its SHA-256, and
each entry checked for its four strings (`load_preference_data`), with the fix named.
Used by `course.dpo` (notebook 10).
"""

from __future__ import annotations

import json
from pathlib import Path

from course import settings
from course.artifacts import sha256_of_file

PREFERENCE_DATA_FILE = settings.ROOT / "instruction-data-with-preference.json"
# the book's bonus material's file, as the course ships it
PREFERENCE_DATA_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
PREFERENCE_FIELDS = ("instruction", "input", "chosen", "rejected")
MIN_ENTRIES = 20  # the smallest file whose 85/10/5 split leaves every part non-empty


class PreferenceDataError(ValueError):
    """The preference data file is not what notebook 10 expects."""


def load_preference_data(
    path: str | Path = PREFERENCE_DATA_FILE, expected_sha256: str | None = None
) -> list[dict]:
    """Load and check the preference data: a list of entries with `instruction`, `input`,
    `chosen` and `rejected` strings.

    The course's own file is checked against its SHA-256 (pass `expected_sha256` to
    check another file too); a damaged file or entry names itself and the fix.
    """
    path = Path(path)
    if expected_sha256 is None and path.resolve() == PREFERENCE_DATA_FILE.resolve():
        expected_sha256 = PREFERENCE_DATA_SHA256
    restore = (
        "Restore the course's copy (for example `git checkout -- "
        f"{PREFERENCE_DATA_FILE.name}`, or download the course again)."
    )
    if not path.exists():
        raise PreferenceDataError(f"{path} was not found. {restore}")
    if expected_sha256 is not None and sha256_of_file(path) != expected_sha256:
        raise PreferenceDataError(
            f"{path} is not the expected file (its SHA-256 differs): it was changed or "
            f"damaged. {restore}"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PreferenceDataError(f"{path} is not valid JSON text ({exc}). {restore}") from None
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: expected a JSON list of entries.")
    for index, entry in enumerate(data):
        for field in PREFERENCE_FIELDS:
            if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
                raise PreferenceDataError(
                    f'{path}: entry {index} has no string field "{field}". Every entry needs '
                    '"instruction", "input" (may be ""), "chosen" and "rejected".'
                )
    if len(data) < MIN_ENTRIES:
        raise PreferenceDataError(
            f"{path} has {len(data)} entries; the 85/10/5 split needs at least {MIN_ENTRIES}."
        )
    return data
