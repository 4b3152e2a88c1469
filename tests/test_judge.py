"""The LLM judge against the stand-in Ollama server: the book's client (helpers.py,
listings 7.10 and 7.11) and the course's robust one (course/judge.py)."""

from __future__ import annotations

import json
import socket
import time
import tracemalloc
import urllib.request

import psutil
import pytest
from ollama_standin import HUGE_REPLY_DIGITS, MODELS, NO_NUMBER_REPLY, OllamaStandIn, judge_reply

import helpers
from course import artifacts, judge, ollama_client
from course.scores import load_scores, score_summary

ENTRIES = [  # response vs output: word-overlap F1 100, 0 and 2/3 -> 67
    {"instruction": "Repeat.", "input": "", "output": "a b c d", "model_response": "a b c d"},
    {"instruction": "Name a colour.", "input": "", "output": "red", "model_response": "blue"},
    {
        "instruction": "Say it.",
        "input": "x y",
        "output": "one two three four",
        "model_response": "one two",
    },
]
EXPECTED = [100, 0, 67]
BOOK_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
PHI3 = dict(MODELS[0], name="phi3:latest", model="phi3:latest", digest="b" * 64)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def post_chat(url: str, body: dict) -> tuple[int, str, list[dict]]:
    request = urllib.request.Request(
        url + "/api/chat",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            lines = [json.loads(line) for line in response.read().decode().splitlines() if line]
            return response.status, response.headers["Content-Type"], lines
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], [json.loads(exc.read().decode())]


def prompt_of(index: int) -> str:
    return helpers.judge_prompt(ENTRIES[index], "model_response")


# -- the stand-in speaks Ollama's protocol -------------------------------------


def test_standin_get_endpoints(ollama_standin):
    with urllib.request.urlopen(ollama_standin.url + "/", timeout=5) as response:
        assert response.read() == b"Ollama is running"
    version = judge.ollama_get(ollama_standin.url, "/api/version")
    assert set(version) == {"version"} and version["version"].count(".") == 2
    tags = judge.ollama_get(ollama_standin.url, "/api/tags")
    (entry,) = tags["models"]
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert entry["name"] == "llama3:latest" and len(entry["digest"]) == 64


def test_standin_streams_ndjson_chunks_then_a_done_chunk(ollama_standin):
    body = {"model": "llama3", "messages": [{"role": "user", "content": prompt_of(2)}]}
    status, content_type, chunks = post_chat(ollama_standin.url, body)
    assert status == 200 and content_type == "application/x-ndjson"
    *parts, final = chunks
    assert len(parts) >= 1
    for part in parts:
        assert set(part) == {"model", "created_at", "message", "done"}
        assert part["done"] is False and part["message"]["role"] == "assistant"
        assert part["model"] == "llama3"
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert {"total_duration", "eval_count", "prompt_eval_count"} <= set(final)
    assert "".join(p["message"]["content"] for p in parts) == "67"


def test_standin_answers_one_object_without_streaming(ollama_standin):
    body = {
        "model": "llama3:latest",
        "stream": False,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    status, content_type, (answer,) = post_chat(ollama_standin.url, body)
    assert status == 200 and content_type.startswith("application/json")
    assert answer["done"] is True and answer["done_reason"] == "stop"
    assert answer["message"]["content"] and not answer["message"]["content"].isdigit()


def test_standin_unknown_model_is_404(ollama_standin):
    status, _, (answer,) = post_chat(ollama_standin.url, {"model": "phi3", "messages": []})
    assert status == 404 and answer == {"error": "model 'phi3' not found"}


def test_standin_scores_word_overlap():
    for index, expected in enumerate(EXPECTED):
        assert judge_reply(prompt_of(index)) == str(expected)


# -- finding the server ----------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "http://localhost:11434"),
        ("", "http://localhost:11434"),
        ("localhost", "http://localhost:11434"),
        ("0.0.0.0", "http://localhost:11434"),
        ("0.0.0.0:11435", "http://localhost:11435"),
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://gpu-box:11434/", "http://gpu-box:11434"),
        ("http://gpu-box", "http://gpu-box:80"),
        ("https://ollama.example.org", "https://ollama.example.org:443"),
        ("[::1]:11434", "http://[::1]:11434"),
    ],
)
def test_ollama_host_reads_ollama_host_like_ollama(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", value)
    assert judge.ollama_host() == expected


@pytest.mark.parametrize(
    "value, why",
    [
        ("localhost:abc", "'abc'"),
        ("localhost:99999", "out of range"),
        ("ftp://gpu-box:11434", "'ftp' is not http or https"),
        ("local host:11434", "is not http or https"),
    ],
)
def test_an_ollama_host_that_is_no_address_is_refused_clearly(monkeypatch, value, why):
    monkeypatch.setenv("OLLAMA_HOST", value)
    with pytest.raises(judge.JudgeError) as info:
        judge.ollama_host()
    message = str(info.value)
    assert message.startswith(f"OLLAMA_HOST={value!r} is not an address of an Ollama server")
    assert why in message and "localhost:11434" in message


def test_ollama_status_describes_the_judge(ollama_standin):
    status = judge.ollama_status("llama3")
    assert status["tag"] == "llama3:latest"
    assert status["digest"] == MODELS[0]["digest"]
    assert status["ollama_version"] == ollama_standin.version
    assert status["options"] == BOOK_OPTIONS


def test_unreachable_server_says_what_to_run(monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv("OLLAMA_HOST", url)
    with pytest.raises(judge.JudgeError) as info:
        judge.ollama_status()
    message = str(info.value)
    assert url in message and "ollama serve" in message and "OLLAMA_HOST" in message
    with pytest.raises(judge.JudgeError, match="after 2 attempts"):
        judge.query_model("Hi", retries=1, backoff=0.01)


def test_model_not_pulled_says_what_to_run(ollama_standin):
    with pytest.raises(judge.JudgeError, match="ollama pull phi3"):
        judge.ollama_status("phi3")
    with pytest.raises(judge.JudgeError, match="ollama pull phi3") as info:
        judge.query_model("Hi", model="phi3")
    assert "model 'phi3' not found" in str(info.value)
    assert len(ollama_standin.chat_requests) == 1  # a 404 is not retried


def test_a_proxy_setting_does_not_catch_the_local_server(ollama_standin, monkeypatch):
    monkeypatch.setenv("http_proxy", closed_port_url())
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert judge.ollama_status()["tag"] == "llama3:latest"
    assert judge.query_model(prompt_of(0)) == "100"


def test_check_if_running_sees_local_processes():
    assert helpers.check_if_running(psutil.Process().name())
    assert not helpers.check_if_running("no-such-process-name-7f3a")


# -- the book's listings 7.10 and 7.11 (helpers.py) ---------------------------------


def test_the_books_query_model_sends_the_books_request(ollama_standin):
    url = ollama_standin.url + "/api/chat"
    assert helpers.query_model(prompt_of(2), url=url) == "67"
    (body,) = ollama_standin.chat_requests
    assert body == {
        "model": "llama3",
        "messages": [{"role": "user", "content": prompt_of(2)}],
        "options": BOOK_OPTIONS,
    }


def test_the_books_generate_model_scores(ollama_standin, capsys):
    url = ollama_standin.url + "/api/chat"
    assert helpers.generate_model_scores(ENTRIES, "model_response", url=url) == EXPECTED
    ollama_standin.set_fault("no-number", times=1)
    assert helpers.generate_model_scores(ENTRIES, "model_response", url=url) == EXPECTED[1:]
    assert f"Could not convert score: {NO_NUMBER_REPLY!r}" in capsys.readouterr().out


# -- query_model (course.judge) ---------------------------------------------------


def test_query_model_sends_the_books_request(ollama_standin):
    assert judge.query_model(prompt_of(2)) == "67"
    (body,) = ollama_standin.chat_requests
    assert body["model"] == "llama3"
    assert body["messages"] == [{"role": "user", "content": prompt_of(2)}]
    assert body["options"] == BOOK_OPTIONS
    assert body.get("stream", True) is True


def test_query_model_waits_two_minutes_per_piece_ten_in_all_by_default():
    import inspect

    defaults = {
        name: p.default for name, p in inspect.signature(judge.query_model).parameters.items()
    }
    assert (defaults["timeout"], defaults["retries"], defaults["max_seconds"]) == (120, 2, 600)
    assert "10 minutes" in judge.query_model.__doc__ and "2 minutes" in judge.query_model.__doc__


def test_query_model_retries_after_500(ollama_standin):
    ollama_standin.set_fault("http-500", times=2)
    assert judge.query_model(prompt_of(0), backoff=0.01) == "100"
    assert len(ollama_standin.chat_requests) == 3


def test_query_model_gives_up_after_repeated_500(ollama_standin):
    ollama_standin.set_fault("http-500")
    with pytest.raises(judge.JudgeError, match="HTTP 500") as info:
        judge.query_model("Hi", retries=2, backoff=0.01)
    assert "llama runner process has terminated" in str(info.value)
    assert len(ollama_standin.chat_requests) == 3


def test_query_model_retries_a_dropped_connection(ollama_standin):
    ollama_standin.set_fault("disconnect", times=1)
    assert judge.query_model(prompt_of(1), backoff=0.01) == "0"
    assert len(ollama_standin.chat_requests) == 2


def test_error_line_in_the_stream_is_a_clear_error(ollama_standin):
    ollama_standin.set_fault("error-mid-stream", times=1)
    with pytest.raises(judge.JudgeError, match="failed while answering: an error was encountered"):
        judge.query_model(prompt_of(0))


def test_slow_reply_times_out_with_advice_and_succeeds_with_patience(ollama_standin):
    ollama_standin.set_fault("slow", delay=0.6)
    with pytest.raises(judge.JudgeError, match="did not answer in time") as info:
        judge.query_model("Hi", timeout=0.2, retries=1, backoff=0.01)
    assert "waits at most 0.2 s for each piece of the answer and 600 s in all" in str(info.value)
    assert judge.query_model(prompt_of(2), timeout=5) == "67"


def test_reply_without_number(ollama_standin):
    ollama_standin.set_fault("no-number")
    assert judge.query_model("Hi") == NO_NUMBER_REPLY
    assert helpers.parse_score(NO_NUMBER_REPLY) is None


# -- hostile servers: bounded time and memory --------------------------------------


def test_an_endless_api_version_costs_at_most_its_limit_in_memory(ollama_standin):
    ollama_standin.set_fault("endless-version")  # 64 KiB pieces as fast as they go
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(judge.JudgeError, match="not like an Ollama server") as info:
            judge.ollama_status()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5
    assert f"longer than {judge.MAX_STATUS_BYTES:,} bytes" in str(info.value)
    assert ollama_standin.sent_bytes > judge.MAX_STATUS_BYTES  # it did stream past the limit
    assert peak < 4 * judge.MAX_STATUS_BYTES  # ... and the client kept about the limit
    sent = ollama_standin.sent_bytes
    time.sleep(0.2)
    assert ollama_standin.sent_bytes - sent < 1 << 20  # the client hung up: the stream ends


def test_a_slowly_endless_api_version_ends_at_the_timeout(ollama_standin):
    ollama_standin.set_fault("endless-version", delay=0.02, size=8)
    started = time.monotonic()
    with pytest.raises(judge.JudgeError, match="waited at most 1 s"):
        judge.ollama_status(timeout=1)
    assert 0.9 < time.monotonic() - started < 3


def test_a_chat_answer_trickling_forever_ends_at_max_seconds(ollama_standin):
    ollama_standin.set_fault("trickle", delay=0.002)  # one byte every 2 ms, never done
    started = time.monotonic()
    with pytest.raises(judge.JudgeError, match="did not answer in time") as info:
        judge.query_model("Hi", max_seconds=1.5, backoff=0.01)
    assert 1.4 < time.monotonic() - started < 4
    assert "1.5 s in all" in str(info.value)
    assert ollama_standin.sent_bytes > 100  # bytes did keep coming: no silence to time out


def test_a_chat_answer_without_end_stops_at_the_reply_limit(ollama_standin, monkeypatch):
    monkeypatch.setattr(ollama_client, "MAX_REPLY_BYTES", 4000)
    ollama_standin.set_fault("trickle")  # one byte per chunk, as fast as it goes
    started = time.monotonic()
    with pytest.raises(judge.JudgeError, match="longer than 4,000 bytes: that is no score"):
        judge.query_model("Hi")
    assert time.monotonic() - started < 5
    assert len(ollama_standin.chat_requests) == 1  # not retried: another try ends the same


def test_a_reply_of_5000_digits_is_no_score_and_scoring_goes_on(ollama_standin, tmp_path, capsys):
    ollama_standin.set_fault("huge-reply", times=1)
    reply = judge.query_model("Hi")
    assert len(reply) == HUGE_REPLY_DIGITS and reply.isdigit()
    with pytest.raises(ValueError, match="4300 digits"):
        int(reply)  # what the book's int(reply) meets: the error that stopped scoring

    path = tmp_path / "scores.json"
    ollama_standin.set_fault("huge-reply", times=1)
    scores = judge.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    assert scores == EXPECTED[1:]
    out = capsys.readouterr().out
    assert "Could not convert score: '1234567890" in out and "(5,000 characters)" in out
    (run,) = json.loads(path.read_text())["runs"]
    assert run["entries"][0]["reply"] == reply and run["entries"][0]["score"] is None
    assert run["summary"]["unreadable"] == 1 and run["summary"]["scored"] == 2
    # the rerun that failed forever before: the unreadable entry is kept, not asked again
    assert judge.generate_model_scores(ENTRIES, "model_response", scores_path=path) == EXPECTED[1:]


def test_the_books_generate_model_scores_survives_a_reply_of_5000_digits(ollama_standin, capsys):
    ollama_standin.set_fault("huge-reply", times=1)
    url = ollama_standin.url + "/api/chat"
    assert helpers.generate_model_scores(ENTRIES, "model_response", url=url) == EXPECTED[1:]
    assert "Could not convert score: '12345678901234567890" in capsys.readouterr().out


# -- parse_score -------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, score",
    [
        ("85", 85),
        (" 85\n", 85),
        ("Score: 85", 85),
        ("85/100", 85),
        ("85 / 100", 85),
        ("**85**", 85),
        ("85.", 85),
        ("I would rate it 70 out of 100.", 70),
        ("On a scale from 0 to 100, I give it 42.", 42),
        ("0", 0),
        ("100", 100),
        ("100/100", 100),
        ("101", None),
        ("250", None),
        ("0085", None),
        ("-5", None),
        ("85.5", None),
        ("", None),
        ("Excellent response!", None),
        (NO_NUMBER_REPLY, None),
        ("9" * 4301, None),
        ("7" * 5000, None),
        ("Score: " + "1" * 100_000, None),
    ],
)
def test_parse_score(reply, score):
    assert helpers.parse_score(reply) == score


def test_parse_score_is_fast_on_long_replies():
    started = time.monotonic()
    for reply in ("1" * 200_000, "1" * 100_000 + "a1", ("12 " * 50_000)):
        helpers.parse_score(reply)
    assert time.monotonic() - started < 2


def test_score_summary():
    summary = score_summary([100, 0, 67, None, 95, 9])
    assert summary["entries"] == 6 and summary["scored"] == 5 and summary["unreadable"] == 1
    assert summary["average"] == pytest.approx((100 + 0 + 67 + 95 + 9) / 5)
    assert summary["histogram"] == [2, 0, 0, 0, 0, 0, 1, 0, 0, 2]


# -- generate_model_scores (course.judge) ----------------------------------------------


def test_generate_model_scores_without_file_is_the_books(ollama_standin):
    assert judge.generate_model_scores(ENTRIES, "model_response") == EXPECTED
    assert len(ollama_standin.chat_requests) == len(ENTRIES)


def test_scores_file_keeps_prompt_reply_score_and_judge(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    assert judge.generate_model_scores(ENTRIES, "model_response", scores_path=path) == EXPECTED
    record = json.loads(path.read_text())
    assert record["json_key"] == "model_response"
    assert record["judge"] == {
        "model": "llama3",
        "tag": "llama3:latest",
        "digest": MODELS[0]["digest"],
        "details": MODELS[0]["details"],
        "options": BOOK_OPTIONS,
    }
    (run,) = record["runs"]
    assert run["run"] == 0 and run["ollama_version"] == ollama_standin.version
    assert run["options"] == BOOK_OPTIONS
    assert [e["index"] for e in run["entries"]] == [0, 1, 2]
    assert [e["score"] for e in run["entries"]] == EXPECTED
    assert [e["reply"] for e in run["entries"]] == ["100", "0", "67"]
    assert run["entries"][2]["prompt"] == prompt_of(2)
    assert load_scores(path) == EXPECTED


def test_unreadable_replies_are_kept_and_counted(ollama_standin, tmp_path, capsys):
    ollama_standin.set_fault("no-number", times=1)
    path = tmp_path / "scores.json"
    assert judge.generate_model_scores(ENTRIES, "model_response", scores_path=path) == EXPECTED[1:]
    assert "Could not convert score" in capsys.readouterr().out
    first = json.loads(path.read_text())["runs"][0]["entries"][0]
    assert first["reply"] == NO_NUMBER_REPLY and first["score"] is None
    assert score_summary(load_scores(path))["unreadable"] == 1


def test_interrupted_scoring_resumes_without_asking_again(ollama_standin, tmp_path, monkeypatch):
    entries = ENTRIES * 3  # 9 entries
    path = tmp_path / "scores.json"
    real_query, calls = judge.query_model, []

    def interrupted_query(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the student stops the cell
        calls.append(1)
        return real_query(*args, **kwargs)

    monkeypatch.setattr(judge, "query_model", interrupted_query)
    with pytest.raises(KeyboardInterrupt):
        judge.generate_model_scores(entries, "model_response", scores_path=path)
    saved = json.loads(path.read_text())["runs"][0]["entries"]
    assert [e["score"] for e in saved] == (EXPECTED * 3)[:4]
    monkeypatch.setattr(judge, "query_model", real_query)

    asked_before = len(ollama_standin.chat_requests)
    assert judge.generate_model_scores(entries, "model_response", scores_path=path) == EXPECTED * 3
    assert len(ollama_standin.chat_requests) - asked_before == 5  # only the 5 not yet scored

    asked_before = len(ollama_standin.chat_requests)
    assert judge.generate_model_scores(entries, "model_response", scores_path=path) == EXPECTED * 3
    assert len(ollama_standin.chat_requests) == asked_before  # all done: nothing asked


def test_progress_is_on_disk_while_scoring_so_a_killed_kernel_loses_little(
    ollama_standin, tmp_path, monkeypatch
):
    """A kernel killed mid-scoring runs no clean-up: what counts is what is already saved."""
    path = tmp_path / "scores.json"
    real_query, on_disk = judge.query_model, []

    def query_and_look(*args, **kwargs):  # what a kill -9 at this moment would leave
        record = json.loads(path.read_text()) if path.exists() else {"runs": [{"entries": []}]}
        on_disk.append(len(record["runs"][0]["entries"]))
        return real_query(*args, **kwargs)

    monkeypatch.setattr(judge, "query_model", query_and_look)
    judge.generate_model_scores(ENTRIES * 2, "model_response", scores_path=path, save_seconds=0)
    assert on_disk == [0, 1, 2, 3, 4, 5]  # saved after every answer with save_seconds=0
    assert load_scores(path) == EXPECTED * 2


def test_changed_response_is_asked_again(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    judge.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    changed = [dict(e) for e in ENTRIES]
    changed[1]["model_response"] = "red"
    asked_before = len(ollama_standin.chat_requests)
    scores = judge.generate_model_scores(changed, "model_response", scores_path=path)
    assert scores == [100, 100, 67]
    assert len(ollama_standin.chat_requests) - asked_before == 1


def test_runs_are_kept_apart(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    judge.generate_model_scores(ENTRIES, "model_response", scores_path=path, run=0)
    ollama_standin.set_fault("no-number", times=1)
    judge.generate_model_scores(ENTRIES, "model_response", scores_path=path, run=1)
    assert load_scores(path, run=0) == EXPECTED
    assert load_scores(path, run=1) == [None] + EXPECTED[1:]
    with pytest.raises(KeyError, match="no run 2"):
        load_scores(path, run=2)


def test_switching_judges_twice_keeps_each_judges_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path))
    stem = artifacts.run_stem("offline")
    llama3, phi3 = artifacts.scores_path(stem, "llama3"), artifacts.scores_path(stem, "phi3")
    assert llama3 != phi3 and llama3.parent == phi3.parent == tmp_path
    with OllamaStandIn(models=[MODELS[0], PHI3]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        for model in ("llama3", "phi3", "llama3", "phi3"):
            path = artifacts.scores_path(stem, model)
            scores = judge.generate_model_scores(ENTRIES, "model_response", model, path)
            assert scores == EXPECTED
        # the second round found each judge's scores and asked nothing again
        assert [body["model"] for body in server.chat_requests] == ["llama3"] * 3 + ["phi3"] * 3
    assert json.loads(llama3.read_text())["judge"]["tag"] == "llama3:latest"
    assert json.loads(phi3.read_text())["judge"]["digest"] == "b" * 64
    assert load_scores(llama3) == load_scores(phi3) == EXPECTED
    assert not (tmp_path / "backups").exists()  # nothing needed a backup


def test_a_new_digest_of_the_judge_starts_anew_and_keeps_numbered_backups(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "scores.json"
    digests = [MODELS[0]["digest"], "a" * 64, "c" * 64]  # llama3 pulled again, twice
    for digest in digests:
        with OllamaStandIn(models=[dict(MODELS[0], digest=digest)]) as server:
            monkeypatch.setenv("OLLAMA_HOST", server.url)
            judge.generate_model_scores(ENTRIES, "model_response", scores_path=path)
            assert len(server.chat_requests) == len(ENTRIES)  # nothing reused from another
    assert json.loads(path.read_text())["judge"]["digest"] == "c" * 64
    first = json.loads((tmp_path / "backups" / "scores.1.json").read_text())
    second = json.loads((tmp_path / "backups" / "scores.2.json").read_text())
    assert first["judge"]["digest"] == digests[0] and second["judge"]["digest"] == digests[1]
    assert "kept as backups/scores.2.json" in capsys.readouterr().out


def test_another_response_key_keeps_the_old_file_as_a_backup(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    judge.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    other = [{**e, "book_response": e["output"]} for e in ENTRIES]
    assert judge.generate_model_scores(other, "book_response", scores_path=path) == [100] * 3
    assert json.loads(path.read_text())["json_key"] == "book_response"
    kept = json.loads((tmp_path / "backups" / "scores.1.json").read_text())
    assert (
        kept["json_key"] == "model_response"
        and load_scores(tmp_path / "backups" / "scores.1.json") == EXPECTED
    )


def test_a_damaged_scores_file_names_itself(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    judge.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    path.write_bytes(path.read_bytes()[:40])  # cut off, as a full disk or a kill leaves it
    with pytest.raises(artifacts.ArtifactError, match=r"scores.json is cut off.*09_scoring"):
        judge.generate_model_scores(ENTRIES, "model_response", scores_path=path)


def test_error_while_scoring_keeps_what_was_scored(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    judge.generate_model_scores(ENTRIES[:1], "model_response", scores_path=path)
    ollama_standin.set_fault("error-mid-stream")
    with pytest.raises(judge.JudgeError):
        judge.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    assert load_scores(path) == EXPECTED[:1]


def test_entries_without_responses_are_refused_before_asking(ollama_standin):
    entries = [dict(ENTRIES[0]), {k: v for k, v in ENTRIES[1].items() if k != "model_response"}]
    with pytest.raises(KeyError, match="entry 1.*07_extracting_responses"):
        judge.generate_model_scores(entries, "model_response")
    assert ollama_standin.chat_requests == []
