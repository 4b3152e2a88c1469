"""Checking a live judge (notebook 12): your responses against the book's, pairwise in both
orders, and two scoring prompts, each request bounded by course.judge's limits and every
reply kept in `<run>-judge-check-<judge>.json` so an interrupted check continues.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import helpers
from course.artifacts import WRITTEN_BY, read_json, write_json
from course.judge import JUDGE_OPTIONS, keep_backup, ollama_host, ollama_status, query_model
from course.judge_stats import correlations, length_score_spearman, pair_outcome, pairwise_summary
from course.scores import prompts_sha256

RECORD_FORMAT = "course-judge-check-1"
RUBRIC = (
    "1 = wrong, off-topic or empty; 2 = mostly wrong, with a correct fragment; "
    "3 = partly correct, with clear gaps or errors; 4 = correct, with small flaws; "
    "5 = correct and complete."
)


def pairwise_prompt(entry: dict, answer_a: str, answer_b: str) -> str:
    """Ask which of two answers is better; the reply ends in MT-Bench's "[[A]]", "[[B]]", "[[C]]"."""
    return (
        "You are a fair judge. Below are an instruction, its correct output and two "
        "answers to it, A and B. Decide which answer carries out the instruction better, "
        "using the correct output as the reference. The order in which the answers are "
        "shown and their length must not sway you. Explain your choice in one or two "
        'sentences, then give your verdict in exactly this form: "[[A]]" if answer A is '
        'better, "[[B]]" if answer B is better, "[[C]]" if they are equally good.\n\n'
        f"[Instruction]\n{helpers.format_input(entry)}\n"
        f"[Correct output]\n{entry['output']}\n"
        f"[The start of answer A]\n{answer_a}\n[The end of answer A]\n"
        f"[The start of answer B]\n{answer_b}\n[The end of answer B]"
    )


def rubric_prompt(entry: dict, response: str) -> str:
    """The chapter's question with a 1-5 rubric instead of a 0-100 scale."""
    return (
        f"Given the input `{helpers.format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"rate the model response `{response}` on this scale: {RUBRIC} "
        "Respond with the number only."
    )


def parse_verdict(reply: str) -> str | None:
    """ "A", "B" or "C" when the reply holds exactly one kind of [[A]]/[[B]]/[[C]], else None."""
    found = set(re.findall(r"\[\[([ABC])\]\]", reply))
    return found.pop() if len(found) == 1 else None


def parse_rubric(reply: str) -> int | None:
    """The level in a rubric reply: the first number, if it is an integer from 1 to 5."""
    match = re.search(r"(?<![\w.])\d+(?:[.,]\d+)?", reply)
    if match is None or not re.fullmatch(r"[1-5]", match.group()):
        return None
    return int(match.group())


def paired_entries(yours: list[dict], book: list[dict], key: str = "model_response") -> int:
    """Check that both lists answer the same test entries, in order; returns how many."""
    if len(yours) != len(book):
        raise ValueError(
            f"Your responses cover {len(yours)} test entries and the book's {len(book)}: "
            "pairing them needs the same test set (the book's data and split, notebook 01)."
        )
    for i, (mine, theirs) in enumerate(zip(yours, book, strict=True)):
        fields = ("instruction", "input", "output")
        if any(mine.get(f) != theirs.get(f) for f in fields):
            raise ValueError(
                f"Entry {i} is another test entry in your responses than in the book's: "
                "pair responses to the same test set (the book's data, notebook 01's split)."
            )
        if not isinstance(mine.get(key), str) or not isinstance(theirs.get(key), str):
            raise KeyError(
                f"Entry {i} has no {key!r} response: run notebook 07_extracting_responses first."
            )
    return len(yours)


def requests_for(yours: list[dict], book: list[dict], key: str = "model_response") -> list[dict]:
    """Every request of a check: each pair in both orders, each response with both prompts."""
    requests = []
    for i, (mine, theirs) in enumerate(zip(yours, book, strict=True)):
        requests.append(
            {"id": f"pair-yours-first-{i}", "prompt": pairwise_prompt(mine, mine[key], theirs[key])}
        )
        requests.append(
            {"id": f"pair-book-first-{i}", "prompt": pairwise_prompt(mine, theirs[key], mine[key])}
        )
    for side, entries in (("yours", yours), ("book", book)):
        for i, entry in enumerate(entries):
            requests.append({"id": f"score-{side}-{i}", "prompt": helpers.judge_prompt(entry, key)})
            requests.append(
                {"id": f"rubric-{side}-{i}", "prompt": rubric_prompt(entry, entry[key])}
            )
    return requests


def load_record(path: Path, judge: dict, key: str) -> dict:
    """The record at `path` if it checked this judge on these responses, else a new one.

    A record of another judge (model digest, options, Ollama version) or of other
    responses is first copied to backups/ beside it (never overwritten), then replaced.
    """
    if path.exists():
        record = read_json(path, WRITTEN_BY["judge-check"])
        same = (
            isinstance(record, dict)
            and record.get("judge") == judge
            and record.get("responses_sha256") == key
            and isinstance(record.get("answers"), dict)
        )
        if same:
            return record
        backup = keep_backup(path)
        print(
            f"{path.name} holds the check of another judge or of other responses (notebook 07 "
            f"made them anew since?): starting anew (the old file is kept as {backup})."
        )
    return {"format": RECORD_FORMAT, "judge": judge, "responses_sha256": key, "answers": {}}


def ask_all(
    requests: list[dict], record: dict, path: Path, model: str, url: str, save_seconds: float
) -> int:
    """Ask the judge every request not yet answered in `record`; returns how many were asked.

    The record is written every `save_seconds`, at the end, and when the loop is
    interrupted or the judge fails, so a killed run loses at most `save_seconds` of answers.
    """
    from tqdm import tqdm

    answers = record["answers"]
    todo = [r for r in requests if answers.get(r["id"], {}).get("prompt") != r["prompt"]]
    last_save, unsaved, asked = time.monotonic(), False, 0
    try:
        for request in tqdm(todo, desc="Asking the judge"):
            reply = query_model(request["prompt"], model, url)
            answers[request["id"]] = {"prompt": request["prompt"], "reply": reply}
            asked, unsaved = asked + 1, True
            if time.monotonic() - last_save >= save_seconds:
                write_json(path, record)
                last_save, unsaved = time.monotonic(), False
    finally:
        if unsaved:
            write_json(path, record)
    return asked


def summarize(record: dict, yours: list[dict], book: list[dict], key: str) -> dict:
    """Read the replies in `record` into verdicts, scores and the statistics of a check."""
    answers = record["answers"]

    def reply(request_id: str) -> str:
        return answers[request_id]["reply"]

    pairs, outcomes = [], []
    for i in range(len(yours)):
        first = parse_verdict(reply(f"pair-yours-first-{i}"))
        second = parse_verdict(reply(f"pair-book-first-{i}"))
        outcome = pair_outcome(first, second)
        outcomes.append(outcome)
        pairs.append({"index": i, "yours_first": first, "book_first": second, "outcome": outcome})
    sides = {"yours": yours, "book": book}
    scores = {
        s: [helpers.parse_score(reply(f"score-{s}-{i}")) for i in range(len(e))]
        for s, e in sides.items()
    }
    rubric = {
        s: [parse_rubric(reply(f"rubric-{s}-{i}")) for i in range(len(e))] for s, e in sides.items()
    }
    all_responses = [e[key] for e in yours + book]
    all_scores, all_levels = scores["yours"] + scores["book"], rubric["yours"] + rubric["book"]
    both = [
        (s, r)
        for s, r in zip(all_scores, all_levels, strict=True)
        if s is not None and r is not None
    ]
    agreement = correlations([s for s, _ in both], [r for _, r in both])
    summary = pairwise_summary(outcomes)
    return {
        "pairs": pairs,
        **{k: summary[k] for k in ("win_rate", "tie_rate", "loss_rate", "position_flip_rate")},
        "length_score_spearman": length_score_spearman(all_responses, all_scores),
        "length_rubric_spearman": length_score_spearman(all_responses, all_levels),
        "pairwise": summary,
        "scores": scores,
        "rubric": rubric,
        "prompt_agreement": {
            "spearman": agreement["spearman"],
            "kendall": agreement["kendall"],
            "n": agreement["n"],
        },
        "unreadable": {
            "verdicts": sum(p[k] is None for p in pairs for k in ("yours_first", "book_first")),
            "scores": all_scores.count(None),
            "rubric": all_levels.count(None),
        },
    }


def check_judge(
    yours: list[dict],
    book: list[dict],
    path: str | Path,
    model: str = "llama3",
    names: tuple[str, str] = ("your responses", "book-reference-responses.json"),
    key: str = "model_response",
    host: str | None = None,
    save_seconds: float = 5.0,
) -> dict:
    """Check the judge `model` on your responses and the book's; returns the written record.

    Each pair is judged twice (yours shown first, then the book's shown first), and each
    response is scored with the chapter's 0-100 prompt and with a 1-5 rubric. The
    record at `path` keeps every prompt and reply, the judge's description and what was
    judged; run again, it asks only what is not answered yet. Each request waits at most
    2 minutes for each piece of the answer and 10 minutes in all (`course.judge.query_model`).
    """
    path = Path(path)
    paired_entries(yours, book, key)
    base = ollama_host(host)
    status = ollama_status(model, base)
    judge = {k: status[k] for k in ("model", "tag", "digest", "ollama_version")}
    judge["options"] = dict(JUDGE_OPTIONS)
    requests = requests_for(yours, book, key)
    responses_key = prompts_sha256([r["prompt"] for r in requests])
    record = load_record(path, judge, responses_key)
    record["judged"] = {"entries": len(yours), "responses": list(names), "key": key}
    asked = ask_all(requests, record, path, model, f"{base}/api/chat", save_seconds)
    record.update(summarize(record, yours, book, key))
    write_json(path, record)
    reused = len(requests) - asked
    if reused:
        print(f"{reused} of {len(requests)} answers were already in {path.name}")
    return record


def format_check(record: dict, names: tuple[str, str] = ("yours", "the book's")) -> str:
    """The pairwise result of a check for a person: outcomes, flip rate, interval, sign test."""
    s = record["pairwise"]
    yours, theirs = names
    lines = [
        f"pairs judged in both orders: {s['pairs_judged']} "
        f"(without a verdict in one order: {s['pairs_unreadable']})",
        f"  {yours} better in both orders (wins):   {s['wins']}",
        f"  {theirs} better in both orders (losses): {s['losses']}",
        f"  ties in both orders:                  {s['ties']}",
        f"  winner changed with the order (flips): {s['flips']}",
    ]
    if s["pairs_judged"]:
        lines.append(
            f"win rate {s['win_rate']:.3f}, tie rate {s['tie_rate']:.3f}, loss rate "
            f"{s['loss_rate']:.3f}, position flip rate {s['position_flip_rate']:.3f}"
        )
    interval = s["win_minus_loss"]
    if interval is not None:
        low, high = interval["ci95"]
        lines.append(
            f"wins minus losses per pair: {interval['mean']:+.3f}, 95% bootstrap interval "
            f"[{low:+.3f}, {high:+.3f}]"
        )
    if s["sign_test_p"] is not None:
        lines.append(f"sign test (ties and flips left out): p = {s['sign_test_p']:.3g}")
    return "\n".join(lines)
