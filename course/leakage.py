"""Do the splits share instructions? Notebook 01's leakage check: `find_overlaps` reports test
or validation entries whose instruction (word for word, or after normalising case, spacing
and punctuation) also appears in an earlier split, and whether the input matches too.
"""

from __future__ import annotations

import re
import unicodedata

# (the split that is checked, the split it is compared with)
PAIRS = (("val", "train"), ("test", "train"), ("test", "val"))


def normalize(text: str) -> str:
    """`text` in lower case, without punctuation, with single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(char)[0] in "PS" else char for char in text)
    return re.sub(r"\s+", " ", text).strip()


def find_overlaps(
    splits: dict[str, list[dict]], pairs: tuple[tuple[str, str], ...] = PAIRS
) -> list[dict]:
    """Every entry of a split whose instruction appears in the split it is compared with.

    `splits` maps "train", "val", "test" to lists of entries. Each overlap is a dict:
    `split` and `index` (the entry), `other` and `other_indices` (the entries with the
    same instruction there), `match` ("exact" or "near") and `same_prompt` (True when
    one of them has the same input as well, after normalising).
    """
    overlaps = []
    for name, other in pairs:
        exact: dict[str, list[int]] = {}
        near: dict[str, list[int]] = {}
        for index, entry in enumerate(splits[other]):
            exact.setdefault(entry["instruction"], []).append(index)
            near.setdefault(normalize(entry["instruction"]), []).append(index)
        for index, entry in enumerate(splits[name]):
            if entry["instruction"] in exact:
                match, found = "exact", exact[entry["instruction"]]
            elif normalize(entry["instruction"]) in near:
                match, found = "near", near[normalize(entry["instruction"])]
            else:
                continue
            own_input = normalize(entry["input"])
            same_prompt = any(normalize(splits[other][i]["input"]) == own_input for i in found)
            overlaps.append(
                {
                    "split": name,
                    "index": index,
                    "other": other,
                    "other_indices": found,
                    "match": match,
                    "same_prompt": same_prompt,
                }
            )
    return overlaps


def summarize(splits: dict[str, list[dict]], overlaps: list[dict] | None = None) -> list[dict]:
    """Per pair of splits: entries checked, exact and near instruction matches, same prompts."""
    overlaps = find_overlaps(splits) if overlaps is None else overlaps
    rows = []
    for name, other in PAIRS:
        found = [o for o in overlaps if o["split"] == name and o["other"] == other]
        rows.append(
            {
                "split": name,
                "other": other,
                "entries": len(splits[name]),
                "exact": sum(o["match"] == "exact" for o in found),
                "near": sum(o["match"] == "near" for o in found),
                "same_prompt": sum(o["same_prompt"] for o in found),
            }
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    """The rows of `summarize` as a small table."""
    lines = [
        f"{'':14}{'entries':>9}{'same instruction':>18}{'near-duplicate':>16}{'same prompt':>13}",
    ]
    for row in rows:
        lines.append(
            f"{row['split'] + ' vs ' + row['other']:14}{row['entries']:>9,}{row['exact']:>18,}"
            f"{row['near']:>16,}{row['same_prompt']:>13,}"
        )
    return "\n".join(lines)
