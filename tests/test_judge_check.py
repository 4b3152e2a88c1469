"""Notebook 12: the shipped judges' numbers, ROUGE-L, and a live judge's biases caught.

The live check (`course.judge_check`) runs against the Ollama stand-in, unbiased and
made biased on purpose (one that always prefers the answer shown first, one that
scores by length): the record must report each bias. A check killed with SIGKILL
resumes where it stopped.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ollama_standin import OllamaStandIn

from course import artifacts, judge_check, judge_stats
from course.exercises.kendall import check_kendall_tau

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "12_can_you_trust_the_judge.ipynb"
SCORES = ROOT / "judge-scores"


def shipped(name: str):
    return json.loads((SCORES / name).read_text(encoding="utf-8"))


def two_models(limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """The shipped 100 entries as two response sets: model 1 ("yours") and model 2."""
    entries = shipped("eval-example-data.json")[:limit]
    fields = ("instruction", "input", "output")
    sets = []
    for key in ("model 1 response", "model 2 response"):
        sets.append(
            [{**{f: e[f] for f in fields}, "model_response": e[key].strip()} for e in entries]
        )
    return sets[0], sets[1]


def notebook_functions(*names: str) -> dict:
    """Run the notebook's cell that defines `names` and return its namespace."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and all(f"def {n}(" in source for n in names):
            namespace = {}
            setup, _, _ = source.partition("\nentry = eval_data[0]")  # the definitions only
            exec(compile(setup, "<notebook 12>", "exec"), namespace)
            return namespace
    raise AssertionError(f"no cell of {NOTEBOOK.name} defines {names}")


# -- the two real judges ---------------------------------------------------------------


def test_the_shipped_scores_give_the_books_correlations():
    agreement = judge_stats.correlations(
        shipped("gpt4-model-1-response.json"), shipped("llama3-8b-model-1-response.json")
    )
    assert agreement["n"] == 100
    assert round(agreement["pearson"], 5) == 0.80489
    assert round(agreement["spearman"], 6) == 0.698406
    assert round(agreement["kendall"], 5) == 0.57292


def test_a_damaged_shipped_file_is_named_with_its_fix(tmp_path):
    import shutil

    from course.artifacts import ArtifactError

    shutil.copytree(SCORES, tmp_path / "judge-scores")
    assert judge_stats.load_judge_scores(tmp_path / "judge-scores")["gpt4-model-1-response.json"]
    damaged = tmp_path / "judge-scores" / "gpt4-model-2-response.json"
    damaged.write_bytes(damaged.read_bytes()[:-10])  # cut short, as a broken download is
    with pytest.raises(ArtifactError, match="gpt4-model-2-response.json is not the shipped file"):
        judge_stats.load_judge_scores(tmp_path / "judge-scores")
    damaged.unlink()
    with pytest.raises(ArtifactError, match="git checkout -- judge-scores/gpt4-model-2"):
        judge_stats.load_judge_scores(tmp_path / "judge-scores")


def test_the_llama_file_of_model_2_has_lost_an_entry():
    assert len(shipped("eval-example-data.json")) == 100
    assert len(shipped("llama3-8b-model-2-response.json")) == 99
    with pytest.raises(ValueError, match="one value of each list per entry"):
        judge_stats.correlations(
            shipped("gpt4-model-2-response.json"), shipped("llama3-8b-model-2-response.json")
        )


def test_the_stored_notebook_shows_the_books_numbers_beside_its_own():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    printed = "".join(
        "".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c["outputs"]
    )
    for ours, books in (("0.804890", "0.80489"), ("0.698406", "0.698406"), ("0.572920", "0.57292")):
        assert f"{ours}   the book's: {books}" in printed


# -- yardsticks without a judge ----------------------------------------------------------


def test_the_notebooks_rouge_l_equals_the_rouge_score_package():
    from rouge_score import rouge_scorer

    nb = notebook_functions("rouge_l_f1", "exact_match")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        (e[k], e["output"])
        for e in shipped("eval-example-data.json")
        for k in ("model 1 response", "model 2 response")
    ]
    pairs += [
        ("", "a reference"),
        ("an answer", ""),
        ("", ""),
        ("Paris!", "paris"),
        ("the the cat", "the cat the"),
        ("It's 3.5 km, not 3 km.", "It is 3.5 km"),
    ]
    checked = 0
    for answer, reference in pairs:
        expected = scorer.score(reference, answer)["rougeL"].fmeasure
        assert math.isclose(nb["rouge_l_f1"](answer, reference), expected, abs_tol=1e-12), (
            answer,
            reference,
        )
        checked += 1
    assert checked == 206


def test_the_notebooks_exact_match_compares_the_words_rouge_compares():
    from rouge_score import tokenizers

    nb = notebook_functions("rouge_l_f1", "exact_match")
    tokenize = tokenizers.DefaultTokenizer(use_stemmer=False).tokenize
    matches = 0
    for e in shipped("eval-example-data.json"):
        for key in ("model 1 response", "model 2 response"):
            same = tokenize(e[key]) == tokenize(e["output"])
            assert nb["exact_match"](e[key], e["output"]) == int(same)
            matches += same
    assert 0 < matches < 200  # both outcomes occur
    assert nb["exact_match"]("The capital is Paris.", "the capital is paris") == 1
    assert nb["exact_match"]("Paris", "The capital is Paris.") == 0


# -- a live judge and its biases -------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, "first", "length"])
def test_the_check_reports_each_judges_bias(bias, tmp_path):
    yours, book = two_models()
    with OllamaStandIn(bias=bias) as judge:
        path = tmp_path / "run-judge-check-llama3.json"
        record = judge_check.check_judge(yours, book, path, host=judge.url)
        asked = len(judge.chat_requests)
    assert asked == 600  # 100 pairs in two orders, 200 responses with two prompts
    saved = json.loads(path.read_text())
    assert saved["position_flip_rate"] == record["position_flip_rate"]
    for key in ("pairs", "win_rate", "tie_rate", "position_flip_rate", "length_score_spearman"):
        assert key in saved, key
    assert saved["judged"]["entries"] == 100 and len(saved["pairs"]) == 100
    flips, length = saved["position_flip_rate"], saved["length_score_spearman"]
    if bias == "first":
        assert flips >= 0.95
        assert saved["win_rate"] == saved["loss_rate"] == 0.0
    elif bias == "length":
        assert length >= 0.8
        assert flips <= 0.05
    else:
        # word overlap: order does not matter; its F1 penalizes extra words a little, so
        # on these answers length and score correlate weakly (and negatively)
        assert flips <= 0.05
        assert abs(length) < 0.35
        assert saved["win_rate"] > saved["loss_rate"]  # model 1 is the better one


def test_the_notebook_runs_this_check():
    sources = "".join(
        "".join(c["source"]) for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    )
    assert "judge_check.check_judge(" in sources
    assert "artifacts.judge_check_path(out_stem, JUDGE_MODEL)" in sources


def test_unreadable_replies_stay_in_place_as_null(tmp_path):
    yours, book = two_models(5)
    with OllamaStandIn() as judge:
        judge.set_fault("no-number", times=1)  # the first request: the first pair, yours first
        record = judge_check.check_judge(yours, book, tmp_path / "check.json", host=judge.url)
    assert record["pairs"][0]["yours_first"] is None and record["pairs"][0]["outcome"] is None
    assert all(p["outcome"] is not None for p in record["pairs"][1:])
    assert record["pairwise"]["pairs_unreadable"] == 1
    assert record["unreadable"]["verdicts"] == 1


def test_the_record_is_keyed_to_the_responses_and_kept_on_change(tmp_path):
    yours, book = two_models(6)
    path = tmp_path / "check.json"
    with OllamaStandIn() as judge:
        judge_check.check_judge(yours, book, path, host=judge.url, save_seconds=0)
        first = len(judge.chat_requests)
        judge_check.check_judge(yours, book, path, host=judge.url)
        assert len(judge.chat_requests) == first  # nothing asked again
        yours[2] = {**yours[2], "model_response": "Something else entirely."}
        judge_check.check_judge(yours, book, path, host=judge.url)
        assert len(judge.chat_requests) == 2 * first
    backups = list((tmp_path / "backups").glob("check.*.json"))
    assert len(backups) == 1
    assert (
        json.loads(backups[0].read_text())["responses_sha256"]
        != json.loads(path.read_text())["responses_sha256"]
    )


def test_responses_to_other_entries_are_refused(tmp_path):
    yours, book = two_models(4)
    with pytest.raises(ValueError, match="Entry 1 is another test entry"):
        judge_check.check_judge(yours, [book[0], book[2], book[1], book[3]], tmp_path / "x.json")
    with pytest.raises(ValueError, match="the same test set"):
        judge_check.check_judge(yours, book[:3], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
from test_judge_check import two_models
from course import judge_check
yours, book = two_models(20)
judge_check.check_judge(yours, book, Path(sys.argv[2]), host=sys.argv[3], save_seconds=0)
"""


def test_a_killed_check_continues_where_it_stopped(tmp_path):
    yours, book = two_models(20)
    path = tmp_path / "run-judge-check-llama3.json"
    with OllamaStandIn() as judge:
        judge.set_fault("slow", delay=0.1)  # every answer takes a moment (12 s for all 120)
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, str(ROOT), str(path), judge.url],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        answered = 0
        while answered < 30 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
            try:
                answered = len(json.loads(path.read_text())["answers"])
            except (OSError, ValueError, KeyError):
                pass
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL
        answered = len(json.loads(path.read_text())["answers"])
        assert 30 <= answered < 120
        judge.set_fault(None)
        before = len(judge.chat_requests)
        resumed = judge_check.check_judge(yours, book, path, host=judge.url)
        asked_again = len(judge.chat_requests) - before
    assert asked_again == 120 - answered
    with OllamaStandIn() as judge:
        whole = judge_check.check_judge(yours, book, tmp_path / "whole.json", host=judge.url)
    assert resumed["pairs"] == whole["pairs"]
    assert resumed["scores"] == whole["scores"] and resumed["rubric"] == whole["rubric"]


def test_the_record_is_named_after_the_run_and_the_judge():
    path = artifacts.judge_check_path("gpt2-medium355M", "llama3:8b")
    assert path.name == "gpt2-medium355M-judge-check-llama3-8b.json"
    assert artifacts.WRITTEN_BY["judge-check"] == NOTEBOOK.stem


# -- reading verdicts and the statistics ---------------------------------------------------


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Answer A is better. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Equally good: [[C]]", "C"),
        ("A is better [[A]], though [[B]] is close", None),
        ("A is better", None),
        ("[A]", None),
    ],
)
def test_verdicts_are_read_as_mt_bench_writes_them(reply, verdict):
    assert judge_check.parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "reply, level",
    [("4", 4), ("Rating: 5", 5), ("0", None), ("6", None), ("3.5", None), ("", None)],
)
def test_rubric_levels_are_one_to_five(reply, level):
    assert judge_check.parse_rubric(reply) == level


def test_a_pair_counts_only_when_both_orders_agree():
    assert judge_stats.pair_outcome("A", "B") == "win"  # yours first: A; book first: B = yours
    assert judge_stats.pair_outcome("B", "A") == "loss"
    assert judge_stats.pair_outcome("C", "C") == "tie"
    assert judge_stats.pair_outcome("A", "A") == "inconsistent"  # always the first shown
    assert judge_stats.pair_outcome("A", None) is None
    summary = judge_stats.pairwise_summary(["win", "win", "loss", "inconsistent", None])
    assert summary["win_rate"] == 0.5 and summary["position_flip_rate"] == 0.25
    assert summary["pairs_unreadable"] == 1
    assert summary["win_minus_loss"]["mean"] == pytest.approx(0.25)


def test_a_constant_judge_has_no_rank_correlation():
    assert judge_stats.length_score_spearman(["a b", "a", "a b c"], [50, 50, 50]) is None
    assert judge_stats.correlations([1, 2, 3], [5, 5, 5])["spearman"] is None


# -- the exercise: Kendall's tau ---------------------------------------------------------------


def solution_kendall_tau(x, y):
    n = len(x)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = n * (n - 1) // 2
    return (concordant - discordant) / math.sqrt((pairs - tied_x) * (pairs - tied_y))


def tau_a(x, y):  # ignores ties in the denominator: what students often write first
    n = len(x)
    s = sum(
        ((x[i] - x[j]) * (y[i] - y[j]) > 0) - ((x[i] - x[j]) * (y[i] - y[j]) < 0)
        for i in range(n)
        for j in range(i + 1, n)
    )
    return s / (n * (n - 1) / 2)


def every_ordered_pair(x, y):  # counts each pair twice and divides by n(n-1)/2
    n = len(x)
    s = sum(
        ((x[i] - x[j]) * (y[i] - y[j]) > 0) - ((x[i] - x[j]) * (y[i] - y[j]) < 0)
        for i in range(n)
        for j in range(n)
    )
    return s / (n * (n - 1) / 2)


def test_the_kendall_check_accepts_the_solution_and_names_mistakes():
    judges = (shipped("gpt4-model-1-response.json"), shipped("llama3-8b-model-1-response.json"))
    assert check_kendall_tau(lambda x, y: None).status == "not attempted"
    assert check_kendall_tau(solution_kendall_tau, judges).status == "right"
    wrong = check_kendall_tau(every_ordered_pair, judges)
    assert wrong.status == "wrong" and "count each of the 6 pairs" in wrong.message
    ties = check_kendall_tau(tau_a, judges)
    assert ties.status == "wrong" and "a tie in x" in ties.message
    raising = check_kendall_tau(lambda x, y: x / y)
    assert raising.status == "wrong" and "TypeError" in raising.message


def test_the_notebooks_solution_passes_its_check():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    folded = next(
        "".join(c["source"])
        for c in cells
        if "def kendall_tau(x, y):\n    n = len(x)" in "".join(c["source"])
    )
    code = folded.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(code, namespace)
    judges = (shipped("gpt4-model-1-response.json"), shipped("llama3-8b-model-1-response.json"))
    assert check_kendall_tau(namespace["kendall_tau"], judges).status == "right"


# -- the course run ------------------------------------------------------------------------


def test_run_course_runs_notebook_12_with_bonus_or_alone():
    import run_course

    notebooks = [Path(f"{i:02d}_step.ipynb") for i in range(1, 13)]

    def numbers(**kwargs):
        return [p.name[:2] for p in run_course.select_notebooks(notebooks, **kwargs)]

    assert numbers() == [f"{i:02d}" for i in range(1, 10)]
    assert numbers(bonus=True)[-3:] == ["10", "11", "12"]
    assert numbers(only="01,04,05,07,12") == ["01", "04", "05", "07", "12"]
    assert numbers(only="12") == ["12"]
