"""The dataset files: which data (COURSE_DATASET), its download checked against a SHA-256,
validation that names the wrong entry, and the saved split with its fingerprint. Used by
notebook 01 (which writes the split), the notebooks that read it, and course.finetune.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
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
BOOK_SPLIT = {"train": 935, "val": 55, "test": 110}  # the book's split of its 1,100 entries

# exercise 7.3: Stanford Alpaca, the file the book's exercise solution uses
ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
ALPACA_ENTRIES = 52_002
SUBSET_SEED = 123  # COURSE_DATA_LIMIT's subset: the same entries on every machine
DOWNLOAD_SECONDS = 30 * 60  # the longest a dataset download may take (it resumes after)


class DatasetError(ValueError):
    """The instruction dataset file is not what the course expects."""


REFETCH = "Delete the file and run the cell again to download it anew."
FIX_BY_HAND = "Fix the file (there is no address to download it from again)."


def validate_instruction_data(data: Any, source: str, fix: str = REFETCH) -> list[dict]:
    """Check that `data` is a list of entries with string instruction/input/output.

    `fix` ends the message when the file as a whole is wrong.
    """
    if not isinstance(data, list):
        raise DatasetError(
            f"{source}: expected a JSON list of entries, got a JSON {type(data).__name__}. " + fix
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
    try:  # what save_split will write must be UTF-8 text
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        _raise_unwritable_entry(data, source)
    return data


def _raise_unwritable_entry(data: list[dict], source: str) -> None:
    """Name the entry and field of `data` that cannot be written as UTF-8 JSON."""
    for index, entry in enumerate(data):
        for field, value in entry.items():
            try:
                json.dumps({field: value}, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(exc.object[exc.start])
                raise DatasetError(
                    f'{source}: entry {index}, field "{field}" holds the escape \\u{code:04x}, '
                    "half of a character pair (a lone surrogate) that is not text on its "
                    "own. Fix that entry (or remove it)."
                ) from None
            except RecursionError:
                raise DatasetError(
                    f'{source}: entry {index}, field "{field}" is nested too deeply to be '
                    "written again. Fix that entry (or remove it)."
                ) from None


def load_instruction_data(
    file_path: str | Path = DATA_FILE,
    url: str = DATA_URL,
    expected_sha256: str | None = None,
    show_progress: bool = False,
    max_bytes: int | None = None,
    max_seconds: float = DOWNLOAD_SECONDS,
) -> list[dict]:
    """Download the dataset when `file_path` is missing, then load and validate it.

    A download from the book's DATA_URL must match DATA_SHA256 (pass `expected_sha256`
    to check a copy from elsewhere). An interrupted download continues where it
    stopped when the cell runs again. A download may bring at most `max_bytes`
    (default: COURSE_DATASET_MAX_MB megabytes) and take at most `max_seconds`.
    """
    from course import downloads  # the robust downloader

    file_path = Path(file_path)
    if not file_path.exists():
        if expected_sha256 is None and url == DATA_URL:
            expected_sha256 = DATA_SHA256
        limit_mb = settings.setting("COURSE_DATASET_MAX_MB")
        try:
            downloads.download_file(
                url,
                file_path,
                show_progress=show_progress,
                expected_sha256=expected_sha256,
                max_bytes=limit_mb * 1_000_000 if max_bytes is None else max_bytes,
                max_seconds=max_seconds,
            )
        except downloads.DownloadTooLarge as exc:
            fix = (
                f"The limit is COURSE_DATASET_MAX_MB={limit_mb} (megabytes): if the file "
                "really is that large, set it higher and run the cell again."
                if max_bytes is None
                else "Pass a larger max_bytes if the file really is that large."
            )
            raise DatasetError(f"{exc} {fix}") from None
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            raise ConnectionError(
                f"Could not download {url}: {downloads.describe_network_error(exc, url)}\n"
                f"Run the cell again (it resumes), or download the file by hand and save "
                f"it as {file_path}."
            ) from exc
        except ValueError as exc:  # the checksum did not match
            raise DatasetError(str(exc)) from None
    fix = REFETCH if url else FIX_BY_HAND
    try:
        text = file_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{file_path}: byte {exc.start} is not UTF-8 text: the file is damaged. {fix}"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{file_path}: not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}). {fix}"
        ) from None
    except RecursionError:
        line, column, entry = _deep_nesting_position(text)
        where, what = f"entry {entry} (line {line}, column {column})", "Fix or remove that entry."
        if entry is None:
            where, what = f"line {line}, column {column}", fix
        raise DatasetError(
            f"{file_path}: brackets nested more than {MAX_NESTING} deep in {where}, too deep "
            f"to read (an entry is one object of three strings). {what}"
        ) from None
    return validate_instruction_data(data, str(file_path), fix)


MAX_NESTING = 500  # [ and { inside each other: an entry needs 2; Python's parser stops near 1,000


def _deep_nesting_position(text: str, limit: int = MAX_NESTING) -> tuple[int, int, int | None]:
    """Where JSON `text` first nests deeper than `limit`: line and column (from 1) and
    the index of the entry of the top-level list (None outside one)."""
    depth, in_string, escaped, entry = 0, False, False, 0
    for position, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                line = text.count("\n", 0, position) + 1
                column = position - (text.rfind("\n", 0, position) + 1) + 1
                in_list = text.lstrip("\ufeff \t\r\n").startswith("[")
                return line, column, entry if in_list else None
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 1:
            entry += 1  # the next entry of the top-level list
    return 1, 1, None


# -- which data: COURSE_DATASET -------------------------------------------------------


def is_url(text: str) -> bool:
    """True for an http(s) address, which COURSE_DATASET downloads."""
    return str(text).strip().lower().startswith(("http://", "https://"))


def data_dir() -> Path:
    """Where downloaded datasets are kept: `data/` in the artifacts folder."""
    return artifacts.artifacts_dir() / "data"


def source_url(dataset: str | None = None) -> str | None:
    """The address COURSE_DATASET's file is downloaded from (None for a local path)."""
    dataset = settings.setting("COURSE_DATASET") if dataset is None else dataset
    if dataset == "book":
        return DATA_URL
    if dataset == "alpaca":
        return ALPACA_URL
    return dataset.strip() if is_url(dataset) else None


def source_file(dataset: str | None = None) -> Path:
    """Where COURSE_DATASET's file is (or will be, once downloaded) on this machine.

    The book's data is the shipped instruction-data.json; "alpaca" and URLs are
    cached in `data_dir()`; a relative path counts from the course's folder.
    """
    dataset = settings.setting("COURSE_DATASET") if dataset is None else dataset
    if dataset == "book":
        return DATA_FILE
    if dataset == "alpaca":
        return data_dir() / "alpaca_data.json"
    if is_url(dataset):
        return data_dir() / f"{settings.dataset_tag(dataset, 0)}.json"
    path = Path(dataset.strip()).expanduser()
    return path if path.is_absolute() else settings.ROOT / path


def load_source_data(dataset: str | None = None, show_progress: bool = True) -> list[dict]:
    """Every entry of COURSE_DATASET's file, validated (downloaded first if needed)."""
    dataset = settings.setting("COURSE_DATASET") if dataset is None else dataset
    path, url = source_file(dataset), source_url(dataset)
    if url is None and not path.exists():
        raise DatasetError(
            f'COURSE_DATASET={dataset!r}: there is no file {path}. Use "book", '
            '"alpaca", the path of a JSON file (a relative path counts from the course '
            "folder) or an http(s) URL."
        )
    if url is None:
        return load_instruction_data(path, url="", expected_sha256=None)
    return load_instruction_data(path, url, show_progress=show_progress and dataset != "book")


def entry_key(entry: dict) -> tuple[str, str, str]:
    """What makes two entries the same: the same instruction, input and output."""
    return entry["instruction"], entry["input"], entry["output"]


def find_repeats(data: list[dict]) -> list[tuple[int, int]]:
    """`(index, index of its first copy)` for every entry that repeats an earlier one."""
    first: dict[tuple[str, str, str], int] = {}
    repeats = []
    for index, entry in enumerate(data):
        key = entry_key(entry)
        if key in first:
            repeats.append((index, first[key]))
        else:
            first[key] = index
    return repeats


def drop_repeats(data: list[dict]) -> list[dict]:
    """`data` without exact repeats (the first copy stays, in file order).

    A repeated entry would otherwise land in the training set and in the test set,
    so the test would ask what training showed word for word.
    """
    repeated = {index for index, _ in find_repeats(data)}
    return [entry for index, entry in enumerate(data) if index not in repeated]


def split_sizes(n: int) -> dict[str, int]:
    """The book's 85/10/5 split of `n` entries: the sizes `helpers.split_data` makes."""
    train = int(n * 0.85)
    test = int(n * 0.1)
    return {"train": train, "val": n - train - test, "test": test}


def minimum_entries(batch_size: int = 8) -> int:
    """The fewest entries the course runs on: 10 with the book's batch size of 8.

    The training loader drops an incomplete last batch, so the 85 % for training
    must fill one batch, and validation and test need an entry each.
    """
    n = 1
    while True:
        sizes = split_sizes(n)
        if sizes["train"] >= batch_size and sizes["val"] >= 1 and sizes["test"] >= 1:
            return n
        n += 1


def check_size(n: int, batch_size: int | None = None, what: str = "The dataset") -> None:
    """Stop with a clear message when `n` entries are too few for the course."""
    batch_size = settings.setting("COURSE_BATCH_SIZE") if batch_size is None else batch_size
    needed = minimum_entries(batch_size)
    if n < needed:
        sizes = split_sizes(n)
        raise DatasetError(
            f"{what} has {n} entries, but the course needs at least {needed}: the 85/10/5 "
            f"split of {n} gives {sizes['train']} training, {sizes['val']} validation and "
            f"{sizes['test']} test entries, and training needs one full batch of "
            f"{batch_size} (COURSE_BATCH_SIZE) plus at least one validation and one test "
            "entry. Use more data (COURSE_DATA_LIMIT=0 takes every entry) or a smaller "
            "COURSE_BATCH_SIZE."
        )


def choose_subset(data: list[dict], limit: int, seed: int = SUBSET_SEED) -> list[dict]:
    """A reproducible random subset of `limit` entries, kept in file order.

    `limit` 0, or at least `len(data)`, keeps every entry. The same data, limit and
    seed give the same entries on every machine.
    """
    if not limit or limit >= len(data):
        return list(data)
    chosen = sorted(random.Random(seed).sample(range(len(data)), limit))
    return [data[index] for index in chosen]


def select_entries(
    data: list[dict], limit: int | None = None, batch_size: int | None = None
) -> list[dict]:
    """The entries the course uses: repeats dropped, COURSE_DATA_LIMIT's subset, size checked."""
    limit = settings.setting("COURSE_DATA_LIMIT") if limit is None else limit
    distinct = drop_repeats(data)
    check_size(
        len(distinct),
        batch_size,
        what="The dataset" + (" without repeats" if len(distinct) < len(data) else ""),
    )
    chosen = choose_subset(distinct, limit)
    check_size(len(chosen), batch_size, what=f"COURSE_DATA_LIMIT={limit}'s subset")
    return chosen


def load_course_data(
    dataset: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """The entries of COURSE_DATASET that the course splits (see `select_entries`)."""
    return select_entries(load_source_data(dataset, show_progress), limit, batch_size)


# -- the split ------------------------------------------------------------------------


def data_fingerprint(data: list[dict]) -> str:
    """A SHA-256 of the entries' content, to tell later whether the dataset changed."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def save_split(data: list[dict], path: str | Path | None = None) -> dict:
    """Split `data` the book's way and save the three parts with the data's fingerprint.

    Exact repeats are dropped first, so each distinct entry lands in one split only
    (`data` from `load_course_data` has none). The file also records which dataset,
    limit and subset seed the entries came from.
    """
    distinct = drop_repeats(data)
    train_data, val_data, test_data = helpers.split_data(distinct)
    split = {
        "dataset": settings.setting("COURSE_DATASET"),
        "dataset_tag": settings.dataset_tag(),
        "data_limit": settings.setting("COURSE_DATA_LIMIT"),
        "subset_seed": SUBSET_SEED,
        "source_fingerprint": data_fingerprint(distinct),
        "train": train_data,
        "val": val_data,
        "test": test_data,
    }
    artifacts.write_json(path or artifacts.split_path(), split)
    return split


def load_split(
    path: str | Path | None = None, data_file: str | Path | None = None
) -> tuple[list[dict], list[dict], list[dict]]:
    """Notebook 01's split of COURSE_DATASET; stops when it is missing or the data changed.

    The entries are recomputed from the dataset's file (`data_file`, by default
    `source_file()`, when it is on this machine) and compared with the fingerprint
    saved with the split.
    """
    path = Path(path or artifacts.split_path())
    notebook = artifacts.WRITTEN_BY["split"]
    split = artifacts.read_json(path, notebook)
    if not isinstance(split, dict) or not all(k in split for k in ("train", "val", "test")):
        raise artifacts.ArtifactError(
            f"{path} is not a split written by notebook {notebook}: run it again."
        )
    url = "" if data_file is not None else source_url() or ""
    data_file = Path(data_file) if data_file is not None else source_file()
    if data_file.exists():
        limit = split.get("data_limit", settings.setting("COURSE_DATA_LIMIT"))
        try:
            entries = load_instruction_data(data_file, url=url)
        except DatasetError as exc:
            raise DatasetError(
                f"{exc}\n(It was readable when notebook {notebook} made the split.)"
            ) from None
        current = data_fingerprint(choose_subset(drop_repeats(entries), limit))
        if current != split.get("source_fingerprint"):
            raise RuntimeError(
                f"{data_file.name} has changed since the split in {path} was made. "
                f"Run notebook {notebook} again to redo the split."
            )
    return split["train"], split["val"], split["test"]
