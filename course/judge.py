"""The judge's scoring loop: every response scored (the book's listing 7.11), kept with
its prompt and raw reply in a scores file that an interrupted run resumes from.
Used by notebook 09 and run_course.py; the HTTP client is `course.ollama_client`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

import helpers
from course.artifacts import WRITTEN_BY, ArtifactError, read_json, write_json

# the client's names, importable from here as notebooks 09 and 11 and the tests use them
from course.ollama_client import (  # noqa: F401
    JUDGE_OPTIONS,
    MAX_STATUS_BYTES,
    JudgeError,
    bounded,
    ollama_get,
    ollama_host,
    ollama_status,
    ollama_urlopen,
    query_model,
)
from course.scores import prompts_sha256, responses_key, score_summary

# the digest the tests' stand-in server reports for its "model" (tests/ollama_standin.py):
# the SHA-256 of "course stand-in judge", the digest of no real model
STANDIN_DIGEST = "fab175d0426aab9e42bb2f500bbbe4bb94f2a1bd5de4b908e1ba6574bf592dd5"


def is_standin(judge: dict) -> bool:
    """True when the judge (`ollama_status`'s answer) is the tests' stand-in, not a model."""
    return judge.get("digest") == STANDIN_DIGEST


def judge_label(judge: dict) -> str:
    """How figures and printed lines name the judge: its tag, or the stand-in as such."""
    if is_standin(judge):
        return f"the tests' stand-in for {judge.get('tag')}, word overlap, not a language model"
    return str(judge.get("tag") or judge.get("model"))


def judge_options(run: int = 0, options: dict | None = None) -> dict:
    """The judge's options for scoring run `run`: the book's (or `options`) with seed + run.

    Run 0 sends exactly the book's request (seed 123). At temperature 0 the judge always
    takes the most likely token and the seed changes nothing; with a temperature above 0
    the seeds make the runs independent samples instead of copies of one another.
    """
    chosen = dict(JUDGE_OPTIONS if options is None else options)
    if "seed" in chosen:
        chosen["seed"] = chosen["seed"] + run
    return chosen


def keep_backup(path: str | Path) -> Path:
    """Copy `path` to backups/<name>.<n><suffix> beside it, n the first number not taken.

    A backup is never overwritten, and backups live in their own folder, so they are
    never mistaken for a judge's scores file. Returns the backup's path (relative to
    the file's folder, for messages).
    """
    path = Path(path)
    folder = path.parent / "backups"
    try:
        folder.mkdir(exist_ok=True)
        data = path.read_bytes()
        number = 1
        while True:
            backup = folder / f"{path.stem}.{number}{path.suffix}"
            try:
                with open(backup, "xb") as f:  # "x": fails if it exists, so never overwrites
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                return backup.relative_to(path.parent)
            except FileExistsError:
                number += 1
    except OSError as exc:
        raise ArtifactError(
            f"Could not keep a backup of {path.name} in {folder} ({exc.strerror}); nothing "
            "was changed. Free some space or make the folder writable, then run the cell again."
        ) from None


def generate_model_scores(
    json_data: list[dict],
    json_key: str,
    model: str = "llama3",
    scores_path: str | Path | None = None,
    run: int = 0,
    url: str | None = None,
    save_seconds: float = 5.0,
    **query_kwargs,
) -> list[int]:
    """Ask the judge to score the response under `json_key` of every entry (the book's).

    Returns the scores it could read, like the book: a score is an integer from 0 to
    100 (`helpers.parse_score`); any other reply is no score, and is counted as such.
    With `scores_path` (one file per judge model: `course.artifacts.scores_path`),
    every entry's prompt, raw reply and score are kept in that JSON file with the
    judge's model, digest, Ollama version and options. It is written every
    `save_seconds` (5), at the end, and when the scoring is interrupted or fails, and
    a scoring run that stopped resumes: entries already answered for the same prompt
    are not asked again. If the file holds scores made otherwise (another digest of
    the model, other options, another response key, another Ollama version for this
    run), it is first copied to a numbered backup (backups/ beside it) that is never
    overwritten. `run` numbers repeated scorings of the same responses; run r asks
    with seed 123 + r (see `judge_options`).

    Each entry is one `query_model` call: it waits at most 2 minutes for each piece
    of the answer and 10 minutes in all (pass `timeout=` and `max_seconds=` to change
    that), so a judge that hangs stops the scoring with a JudgeError within about 10
    minutes; what was scored is kept.
    """
    require_responses(json_data, json_key)
    url = url or f"{ollama_host()}/api/chat"
    options = query_kwargs.get("options")
    base_options = dict(JUDGE_OPTIONS if options is None else options)
    query_kwargs["options"] = judge_options(run, base_options)
    if scores_path is None:
        entries, _ = score_entries(json_data, json_key, model, url, query_kwargs)
        return readable_scores(entries)
    scores_path = Path(scores_path)
    status = ollama_status(model, url.split("/api/")[0])
    judge = {key: status[key] for key in ("model", "tag", "digest", "details")}
    asked_as = {"ollama_version": status["ollama_version"], "options": query_kwargs["options"]}
    key = prompts_sha256([helpers.judge_prompt(entry, json_key) for entry in json_data])
    record = open_scores_record(scores_path, {**judge, "options": base_options}, json_key)
    set_aside_other_responses(record, run, key, scores_path)
    this_run = scores_run(record, run, asked_as, scores_path)
    this_run["responses_sha256"] = key
    saved = {e["index"]: e for e in this_run["entries"]}

    def save_progress(entries: list[dict]) -> None:  # scored so far, and saved beyond it
        this_run["entries"] = entries + [e for i, e in saved.items() if i >= len(entries)]
        this_run.pop("summary", None)  # unfinished again until the loop ends
        write_json(scores_path, record)

    entries, reused = score_entries(
        json_data, json_key, model, url, query_kwargs, saved, save_progress, save_seconds
    )
    finish_scores_record(record, this_run, entries, scores_path, run)
    if reused:
        print(f"{reused} of {len(json_data)} entries were already scored in {scores_path.name}")
    return readable_scores(entries)


def require_responses(json_data: list[dict], json_key: str) -> None:
    """Stop, naming the first entry, when some entries have no response to score."""
    missing = [i for i, entry in enumerate(json_data) if json_key not in entry]
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(json_data)} entries (the first: entry {missing[0]}) have "
            f"no {json_key!r} to score. Responses come from notebook 07_extracting_responses: "
            'run it first, and pass the key its file uses ("model_response").'
        )


def readable_scores(entries: list[dict]) -> list[int]:
    """The scores of the entries whose reply had one, in order (the book's return value)."""
    return [e["score"] for e in entries if e["score"] is not None]


def open_scores_record(scores_path: Path, judge: dict, json_key: str) -> dict:
    """The scores file's record for this judge and response key, or a new one.

    A file that is no scores file, or holds another judge's scores or another key's,
    is kept as a numbered backup and a new record is started.
    """
    if scores_path.exists():
        record = read_json(scores_path, WRITTEN_BY["scores"])
        if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
            backup = keep_backup(scores_path)
            print(
                f"{scores_path.name} is not a scores file: starting anew (the old file "
                f"is kept as {backup})."
            )
        elif record.get("judge") != judge or record.get("json_key") != json_key:
            old_judge = record.get("judge") or {}
            backup = keep_backup(scores_path)
            print(
                f"{scores_path.name} holds scores of another judge or response key "
                f"({old_judge.get('tag')} {str(old_judge.get('digest'))[:12]}, "
                f"options {old_judge.get('options')}, key {record.get('json_key')!r}): "
                f"starting anew (the old file is kept as {backup})."
            )
        else:
            return record
    return {"judge": judge, "json_key": json_key, "runs": []}


def set_aside_other_responses(record: dict, run: int, key: str, scores_path: Path) -> None:
    """Drop the other runs that scored other responses (a backup keeps them)."""
    stale = [r for r in record["runs"] if r["run"] != run and responses_key(r) not in (None, key)]
    if stale:
        backup = keep_backup(scores_path)
        numbers = ", ".join(str(r["run"]) for r in stale)
        print(
            f"Run{'s' if len(stale) > 1 else ''} {numbers} in {scores_path.name} scored other "
            "responses than these (notebook 07 made them anew since), so they are not "
            f"averaged with these: set aside (the old file is kept as {backup}). Score "
            "these responses as many times as you want averaged with COURSE_JUDGE_RUNS."
        )
        record["runs"] = [r for r in record["runs"] if r not in stale]


def scores_run(record: dict, run: int, asked_as: dict, scores_path: Path) -> dict:
    """Run `run` of the record, to continue; a new one when none was asked the same way."""
    runs = [r for r in record["runs"] if r["run"] == run]
    if runs and any(runs[0].get(key) != value for key, value in asked_as.items()):
        backup = keep_backup(scores_path)
        print(
            f"Run {run} in {scores_path.name} was scored with other options or another "
            f"Ollama version ({runs[0].get('options')}, {runs[0].get('ollama_version')}): "
            f"scoring it anew (the old file is kept as {backup})."
        )
        record["runs"].remove(runs[0])
        runs = []
    if not runs:
        runs = [{"run": run, **asked_as, "entries": []}]
        record["runs"].append(runs[0])
        record["runs"].sort(key=lambda r: r["run"])
    return runs[0]


def score_entries(
    json_data: list[dict],
    json_key: str,
    model: str,
    url: str,
    query_kwargs: dict,
    saved: dict | None = None,
    save=None,
    save_seconds: float = 5.0,
) -> tuple[list[dict], int]:
    """Score every entry, reusing `saved` answers to the same prompt: (entries, reused).

    `save(entries)`, when given, runs every `save_seconds` after a new answer and when
    the loop is interrupted or the judge fails.
    """
    from tqdm import tqdm

    saved = saved or {}
    entries, reused = [], 0
    last_save, unsaved = time.monotonic(), False
    try:
        for index, entry in enumerate(tqdm(json_data, desc="Scoring entries")):
            prompt = helpers.judge_prompt(entry, json_key)
            old = saved.get(index)
            if old is not None and old["prompt"] == prompt:
                result, reused = old, reused + 1
            else:
                result, unsaved = ask_judge(index, prompt, model, url, query_kwargs), True
            entries.append(result)
            if save is not None and unsaved and time.monotonic() - last_save >= save_seconds:
                save(entries)
                last_save, unsaved = time.monotonic(), False
    except BaseException:  # interrupted, or the judge failed: keep what was scored
        if save is not None and unsaved:
            save(entries)
        raise
    return entries, reused


def ask_judge(index: int, prompt: str, model: str, url: str, query_kwargs: dict) -> dict:
    """One entry's prompt, the judge's raw reply and its score (None: no score in it)."""
    from tqdm import tqdm

    reply = query_model(prompt, model, url, **query_kwargs)
    result = {"index": index, "prompt": prompt, "reply": reply, "score": helpers.parse_score(reply)}
    if result["score"] is None:
        more = f"... ({len(reply):,} characters)" if len(reply) > 200 else ""
        tqdm.write(f"Could not convert score: {reply[:200]!r}{more}")
    return result


def finish_scores_record(
    record: dict, this_run: dict, entries: list[dict], scores_path: Path, run: int
) -> None:
    """Write the finished run with its summary, and the summary of all finished runs."""
    this_run["entries"] = entries
    this_run["summary"] = score_summary([e["score"] for e in entries])
    finished = [r for r in record["runs"] if "summary" in r]
    averages = [r["summary"]["average"] for r in finished]
    readable = [a for a in averages if a is not None]
    record["summary"] = {
        "runs": len(averages),
        "run_averages": averages,
        "responses_sha256": this_run["responses_sha256"],
        # None (JSON null), not NaN, when no reply of any run had a readable score
        "average": float(np.mean(readable)) if readable else None,
        "std": float(np.std(readable, ddof=1)) if len(readable) > 1 else None,
    }
    write_json(scores_path, record)
    if this_run["summary"]["average"] is None:
        print(
            f"No reply of the judge had a readable score in run {run} ({len(entries)} "
            f"entries): there is no average. Read the replies in {scores_path.name}; a "
            "judge that does not answer with a number needs another model "
            "(COURSE_JUDGE_MODEL) or a look at the server."
        )
