"""Exercise 7.3's data: COURSE_DATASET and COURSE_DATA_LIMIT, repeats, the smallest dataset,
the leakage check, and notebooks 01-04 run on a file served over HTTP.

The server is a real HTTP server on the loopback interface (tests/http_fixtures.py)
serving an Alpaca-format file that the test writes, as a student's own dataset would
be served.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from http_fixtures import FileServer, no_proxy  # noqa: F401
from nbclient import NotebookClient

import course.artifacts
import course.data
import course.leakage
import course.settings
import helpers

ROOT = Path(__file__).resolve().parent.parent


def alpaca_entries(n: int, start: int = 0) -> list[dict]:
    """`n` distinct entries in Stanford Alpaca's format; every third has an input."""
    entries = []
    for i in range(start, start + n):
        if i % 3 == 0:
            entries.append(
                {
                    "instruction": f"Add {i} and {i + 1}.",
                    "input": f"{i}, {i + 1}",
                    "output": f"{i} plus {i + 1} is {2 * i + 1}.",
                }
            )
        else:
            entries.append(
                {
                    "instruction": f"Write the number {i} in words, question {i}.",
                    "input": "",
                    "output": f"The number {i} is written as number {i}.",
                }
            )
    return entries


def as_bytes(entries) -> bytes:
    return json.dumps(entries, indent=1).encode("utf-8")


@pytest.fixture
def course_env(tmp_path, monkeypatch, no_proxy):  # noqa: F811
    """A private artifacts folder and the book's defaults for the dataset settings."""
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path / "artifacts"))
    for name in ("COURSE_DATASET", "COURSE_DATA_LIMIT", "COURSE_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def use_dataset(monkeypatch, dataset: str, limit: int = 0) -> None:
    monkeypatch.setenv("COURSE_DATASET", dataset)
    monkeypatch.setenv("COURSE_DATA_LIMIT", str(limit))


# --- a URL with COURSE_DATA_LIMIT ----------------------------------------------------


def test_url_dataset_is_downloaded_once_and_subset_is_reproducible(course_env, monkeypatch):
    entries = alpaca_entries(300)
    with FileServer({"/data/my-instructions.json": as_bytes(entries)}) as server:
        url = server.url + "/data/my-instructions.json"
        use_dataset(monkeypatch, url, 120)
        first = course.data.load_course_data()
        second = course.data.load_course_data()
        assert len(server.requests_for("/data/my-instructions.json")) == 1  # then the cache

    cached = course.data.source_file()
    assert cached.parent == course.artifacts.artifacts_dir() / "data"
    assert cached.is_file() and json.loads(cached.read_text()) == entries

    assert first == second and len(first) == 120
    positions = [entries.index(entry) for entry in first]
    assert positions == sorted(positions), "the subset keeps file order"
    assert positions != list(range(120)), "the subset is drawn at random, not the first 120"
    # another limit draws another subset; no limit (or a limit above the size) takes all
    assert course.data.load_course_data(limit=60) != first[:60]
    assert course.data.load_course_data(limit=0) == entries
    assert course.data.load_course_data(limit=10_000) == entries


def test_each_dataset_has_its_own_split_and_artifact_names(course_env, monkeypatch):
    book = course.data.load_course_data()
    course.data.save_split(book)
    book_split = course.artifacts.split_path()
    assert book_split.name == "split.json"
    assert course.artifacts.run_stem("offline", course.settings.dataset_tag()) == "offlinetiny"

    with FileServer({"/alpaca.json": as_bytes(alpaca_entries(300))}) as server:
        url = server.url + "/alpaca.json"
        use_dataset(monkeypatch, url, 150)
        data = course.data.load_course_data()
    split = course.data.save_split(data)
    url_split = course.artifacts.split_path()
    tag = course.settings.dataset_tag()
    assert url_split.name == f"split-{tag}.json" and tag.endswith("-n150")
    assert {k: len(split[k]) for k in ("train", "val", "test")} == {
        "train": 127,
        "val": 8,
        "test": 15,
    }
    assert split["dataset"] == url and split["data_limit"] == 150
    stem = course.artifacts.run_stem("offline", tag)
    assert stem.startswith("offlinetiny-") and stem != "offlinetiny"

    # the book's split is still there, untouched, and still loads for the book's setting
    assert course.data.load_split() == helpers.split_data(data)
    use_dataset(monkeypatch, "book")
    assert course.data.load_split() == helpers.split_data(book)
    assert json.loads(book_split.read_text())["dataset"] == "book"


def test_load_split_notices_a_changed_download(course_env, monkeypatch):
    with FileServer({"/d.json": as_bytes(alpaca_entries(200))}) as server:
        use_dataset(monkeypatch, server.url + "/d.json", 50)
        data = course.data.load_course_data()
    course.data.save_split(data)
    assert course.data.load_split()[0] == helpers.split_data(data)[0]

    cached = course.data.source_file()
    changed = json.loads(cached.read_text())
    changed[changed.index(data[0])]["output"] += " (edited)"
    cached.write_text(json.dumps(changed))
    with pytest.raises(RuntimeError, match="01_dataset_download_and_formatting"):
        course.data.load_split()


def test_malformed_served_file_names_the_entry(course_env, monkeypatch):
    entries = alpaca_entries(40)
    del entries[7]["output"]
    entries[12]["input"] = 12
    with FileServer({"/bad.json": as_bytes(entries)}) as server:
        use_dataset(monkeypatch, server.url + "/bad.json")
        with pytest.raises(course.data.DatasetError) as info:
            course.data.load_course_data()
    message = str(info.value)
    assert "entry 7" in message and '"output"' in message, message
    assert str(course.data.source_file()) in message

    # cut short: not JSON, and the fix is to download it again
    with FileServer({"/cut.json": as_bytes(alpaca_entries(40))[:500]}) as server:
        use_dataset(monkeypatch, server.url + "/cut.json")
        with pytest.raises(course.data.DatasetError, match="not valid JSON.*download it anew"):
            course.data.load_course_data()


def test_unreachable_dataset_url_is_clear(course_env, monkeypatch):
    with FileServer({}, fail_status=404) as server:
        url = server.url + "/gone.json"
        use_dataset(monkeypatch, url)
        with pytest.raises(ConnectionError) as info:
            course.data.load_course_data()
    message = str(info.value)
    assert url in message and "404" in message, message
    assert not course.data.source_file().exists()  # nothing half-written under its name


def test_alpaca_is_downloaded_from_the_books_address(course_env, monkeypatch):
    assert course.data.ALPACA_URL == (
        "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
    )
    assert course.data.source_url("alpaca") == course.data.ALPACA_URL
    with FileServer({"/alpaca_data.json": as_bytes(alpaca_entries(100))}) as server:
        monkeypatch.setattr(course.data, "ALPACA_URL", server.url + "/alpaca_data.json")
        use_dataset(monkeypatch, "alpaca", 40)
        data = course.data.load_course_data()
    assert len(data) == 40
    assert course.data.source_file() == course.data.data_dir() / "alpaca_data.json"
    assert course.settings.dataset_tag() == "alpaca-n40"
    assert course.artifacts.split_path().name == "split-alpaca-n40.json"


# --- a local file --------------------------------------------------------------------


def test_local_file_dataset(course_env, monkeypatch):
    path = course_env / "mine.json"
    path.write_text(json.dumps(alpaca_entries(30)), encoding="utf-8")
    use_dataset(monkeypatch, str(path))
    assert course.data.load_course_data() == alpaca_entries(30)

    path.write_text('[{"instruction": "a", "input": "", "output": "b"}, {"inp', encoding="utf-8")
    with pytest.raises(course.data.DatasetError) as info:
        course.data.load_course_data()
    # nothing to download it from: the message must not send the student to delete it
    assert "Fix the file" in str(info.value) and "Delete" not in str(info.value)

    use_dataset(monkeypatch, str(course_env / "missing.json"))
    with pytest.raises(course.data.DatasetError, match="missing.json.*book.*alpaca"):
        course.data.load_course_data()


# --- too little data -----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 5, 9])
def test_too_few_entries_stop_at_load_time(course_env, monkeypatch, n):
    with FileServer({"/small.json": as_bytes(alpaca_entries(n))}) as server:
        use_dataset(monkeypatch, server.url + "/small.json")
        with pytest.raises(course.data.DatasetError) as info:
            course.data.load_course_data()
    message = str(info.value)
    assert f"has {n} entries" in message and "at least 10" in message, message
    assert "COURSE_BATCH_SIZE" in message


def test_minimum_follows_the_split_and_the_batch_size(course_env, monkeypatch):
    assert course.data.minimum_entries(8) == 10
    for batch_size in (1, 4, 8, 16, 32):
        n = course.data.minimum_entries(batch_size)
        sizes = course.data.split_sizes(n)
        assert sizes["train"] >= batch_size and sizes["val"] >= 1 and sizes["test"] >= 1
        smaller = course.data.split_sizes(n - 1)
        assert smaller["train"] < batch_size or min(smaller["val"], smaller["test"]) < 1
        # split_sizes is what helpers.split_data makes
        train, val, test = helpers.split_data(list(range(n)))
        assert (len(train), len(val), len(test)) == (sizes["train"], sizes["val"], sizes["test"])

    data = alpaca_entries(10)
    assert course.data.select_entries(data, limit=0, batch_size=8) == data
    monkeypatch.setenv("COURSE_BATCH_SIZE", "16")
    with pytest.raises(course.data.DatasetError, match="at least 19"):
        course.data.select_entries(data, limit=0)
    monkeypatch.delenv("COURSE_BATCH_SIZE")
    with pytest.raises(course.data.DatasetError, match="COURSE_DATA_LIMIT=5"):
        course.data.select_entries(alpaca_entries(300), limit=5)


# --- repeated entries ----------------------------------------------------------------


def test_every_entry_twice_keeps_each_entry_in_one_split(course_env, monkeypatch):
    entries = alpaca_entries(300)
    doubled = entries + entries
    with FileServer({"/twice.json": as_bytes(doubled)}) as server:
        use_dataset(monkeypatch, server.url + "/twice.json")
        source = course.data.load_source_data()
        data = course.data.load_course_data()
    assert len(course.data.find_repeats(source)) == 300
    assert course.data.find_repeats(source)[0] == (300, 0)
    assert data == entries

    split = course.data.save_split(doubled)  # save_split drops repeats itself too
    keys = {
        name: {course.data.entry_key(e) for e in split[name]} for name in ("train", "val", "test")
    }
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["val"]
    assert not keys["val"] & keys["test"]
    assert sum(len(split[name]) for name in ("train", "val", "test")) == 300
    overlaps = course.leakage.find_overlaps(split)
    assert not any(o["same_prompt"] for o in overlaps)


def test_the_books_data_has_no_repeats_and_keeps_the_books_split(course_env):
    data = course.data.load_course_data()
    assert data == json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))
    assert course.data.find_repeats(data) == []
    split = course.data.save_split(data)
    assert [len(split[k]) for k in ("train", "val", "test")] == [935, 55, 110]
    assert split["source_fingerprint"] == course.data.data_fingerprint(data)


# --- the leakage check ---------------------------------------------------------------


def test_leakage_finds_exact_and_near_duplicates():
    train = [
        {
            "instruction": "Rewrite this sentence as a question.",
            "input": "I am here.",
            "output": "",
        },
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Sort the list.", "input": "3, 1", "output": "1, 3"},
    ]
    val = [{"instruction": "Name a planet.", "input": "", "output": "Mars."}]
    test = [
        {
            "instruction": "rewrite  THIS sentence as a question",
            "input": "You are there.",
            "output": "",
        },
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Sort the list.", "input": "5, 2", "output": "2, 5"},
        {"instruction": "Name a planet!", "input": "", "output": "Venus."},
        {"instruction": "Something new.", "input": "", "output": "Yes."},
    ]
    splits = {"train": train, "val": val, "test": test}
    found = {(o["split"], o["index"], o["other"]): o for o in course.leakage.find_overlaps(splits)}
    assert set(found) == {
        ("test", 0, "train"),
        ("test", 1, "train"),
        ("test", 2, "train"),
        ("test", 3, "val"),
    }
    assert found[("test", 0, "train")]["match"] == "near"
    assert not found[("test", 0, "train")]["same_prompt"]
    assert found[("test", 1, "train")]["match"] == "exact"
    assert found[("test", 1, "train")]["same_prompt"]  # same instruction, both inputs empty
    assert not found[("test", 2, "train")]["same_prompt"]  # same task, another input
    assert found[("test", 3, "val")]["match"] == "near"
    rows = {(r["split"], r["other"]): r for r in course.leakage.summarize(splits)}
    assert rows[("test", "train")] == {
        "split": "test",
        "other": "train",
        "entries": 5,
        "exact": 2,
        "near": 1,
        "same_prompt": 1,
    }
    assert "test vs train" in course.leakage.format_summary(list(rows.values()))


def test_leakage_in_the_books_data(data):
    train, val, test = helpers.split_data(data)
    splits = {"train": train, "val": val, "test": test}
    overlaps = course.leakage.find_overlaps(splits)
    rows = {(r["split"], r["other"]): r for r in course.leakage.summarize(splits, overlaps)}
    assert (rows["test", "train"]["exact"], rows["test", "train"]["near"]) == (18, 1)
    same = [
        o["index"]
        for o in overlaps
        if o["split"] == "test" and o["other"] == "train" and o["same_prompt"]
    ]
    assert same == [40, 99]  # "Generate a sentence using the word 'innovative'."
    assert rows["val", "train"]["same_prompt"] == 4


# --- notebooks 01-04 on a served dataset ----------------------------------------------

NOTEBOOKS = [
    "01_dataset_download_and_formatting.ipynb",
    "02_batching_the_dataset.ipynb",
    "03_creating_data_loaders.ipynb",
    "04_loading_a_pretrained_llm.ipynb",
]


def run_notebook(name: str) -> str:
    """Execute a notebook in a fresh kernel (it inherits this process's environment)."""
    nb = nbformat.read(ROOT / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    text = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", "") + str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_notebooks_01_to_04_run_on_a_served_dataset(course_env, monkeypatch):
    entries = alpaca_entries(300)
    served = entries + entries[:4]  # four repeats, for notebook 01's warning
    monkeypatch.setenv("COURSE_MODEL", "offline")
    monkeypatch.setenv("COURSE_MODELS_DIR", str(course_env / "gpt2"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    with FileServer({"/class/data.json": as_bytes(served)}) as server:
        url = server.url + "/class/data.json"
        use_dataset(monkeypatch, url, 150)
        outputs = {name: run_notebook(name) for name in NOTEBOOKS}

    assert f"COURSE_DATASET={url!r}: 304 entries" in outputs[NOTEBOOKS[0]]
    assert "Warning: 4 entries repeat an earlier entry" in outputs[NOTEBOOKS[0]]
    assert (
        "Entries this run uses: 150 (a random subset, COURSE_DATA_LIMIT=150)"
        in outputs[NOTEBOOKS[0]]
    )
    assert "Training set length: 127" in outputs[NOTEBOOKS[0]]
    assert "Training / validation / test entries: 127 8 15" in outputs[NOTEBOOKS[1]]
    assert "Batches per epoch: train 15, validation 1, test 2" in outputs[NOTEBOOKS[2]]

    tag = course.settings.dataset_tag()
    split = json.loads(course.artifacts.split_path().read_text())
    assert course.artifacts.split_path().name == f"split-{tag}.json"
    assert [len(split[k]) for k in ("train", "val", "test")] == [127, 8, 15]
    assert not (course.artifacts.artifacts_dir() / "split.json").exists()
    stem = course.artifacts.run_stem(course.settings.OFFLINE_MODEL, tag)
    baseline = json.loads(course.artifacts.path_for("baseline", stem).read_text())
    assert [(e["split"], e["index"]) for e in baseline["entries"]] == [
        ("val", 0),
        ("test", 0),
        ("test", 1),
        ("test", 2),
    ]
    assert baseline["entries"][1]["instruction"] == split["test"][0]["instruction"]
