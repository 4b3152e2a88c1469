"""The LLM judge's client (helpers.py section 9) against the stand-in Ollama server."""

from __future__ import annotations

import json
import socket
import urllib.request

import psutil
import pytest
from ollama_standin import MODELS, NO_NUMBER_REPLY, OllamaStandIn, judge_reply

import helpers

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


# -- the stand-in speaks Ollama's protocol -------------------------------------


def test_standin_get_endpoints(ollama_standin):
    with urllib.request.urlopen(ollama_standin.url + "/", timeout=5) as response:
        assert response.read() == b"Ollama is running"
    version = helpers.ollama_get(ollama_standin.url, "/api/version")
    assert set(version) == {"version"} and version["version"].count(".") == 2
    tags = helpers.ollama_get(ollama_standin.url, "/api/tags")
    (entry,) = tags["models"]
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert entry["name"] == "llama3:latest" and len(entry["digest"]) == 64


def test_standin_streams_ndjson_chunks_then_a_done_chunk(ollama_standin):
    body = {
        "model": "llama3",
        "messages": [
            {"role": "user", "content": helpers.judge_prompt(ENTRIES[2], "model_response")}
        ],
    }
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
    for entry, expected in zip(ENTRIES, EXPECTED, strict=True):
        assert judge_reply(helpers.judge_prompt(entry, "model_response")) == str(expected)


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
    assert helpers.ollama_host() == expected


def test_ollama_status_describes_the_judge(ollama_standin):
    status = helpers.ollama_status("llama3")
    assert status["tag"] == "llama3:latest"
    assert status["digest"] == MODELS[0]["digest"]
    assert status["ollama_version"] == ollama_standin.version
    assert status["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}


def test_unreachable_server_says_what_to_run(monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv("OLLAMA_HOST", url)
    with pytest.raises(helpers.JudgeError) as info:
        helpers.ollama_status()
    message = str(info.value)
    assert url in message and "ollama serve" in message and "OLLAMA_HOST" in message
    with pytest.raises(helpers.JudgeError, match="after 2 attempts"):
        helpers.query_model("Hi", retries=1, backoff=0.01)


def test_model_not_pulled_says_what_to_run(ollama_standin):
    with pytest.raises(helpers.JudgeError, match="ollama pull phi3"):
        helpers.ollama_status("phi3")
    with pytest.raises(helpers.JudgeError, match="ollama pull phi3") as info:
        helpers.query_model("Hi", model="phi3")
    assert "model 'phi3' not found" in str(info.value)
    assert len(ollama_standin.chat_requests) == 1  # a 404 is not retried


def test_a_proxy_setting_does_not_catch_the_local_server(ollama_standin, monkeypatch):
    monkeypatch.setenv("http_proxy", closed_port_url())
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert helpers.ollama_status()["tag"] == "llama3:latest"
    assert helpers.query_model(helpers.judge_prompt(ENTRIES[0], "model_response")) == "100"


def test_check_if_running_sees_local_processes():
    assert helpers.check_if_running(psutil.Process().name())
    assert not helpers.check_if_running("no-such-process-name-7f3a")


# -- query_model ----------------------------------------------------------------


def test_query_model_sends_the_books_request(ollama_standin):
    prompt = helpers.judge_prompt(ENTRIES[2], "model_response")
    assert helpers.query_model(prompt) == "67"
    (body,) = ollama_standin.chat_requests
    assert body["model"] == "llama3"
    assert body["messages"] == [{"role": "user", "content": prompt}]
    assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert body.get("stream", True) is True


def test_query_model_retries_after_500(ollama_standin):
    ollama_standin.set_fault("http-500", times=2)
    assert (
        helpers.query_model(helpers.judge_prompt(ENTRIES[0], "model_response"), backoff=0.01)
        == "100"
    )
    assert len(ollama_standin.chat_requests) == 3


def test_query_model_gives_up_after_repeated_500(ollama_standin):
    ollama_standin.set_fault("http-500")
    with pytest.raises(helpers.JudgeError, match="HTTP 500") as info:
        helpers.query_model("Hi", retries=2, backoff=0.01)
    assert "llama runner process has terminated" in str(info.value)
    assert len(ollama_standin.chat_requests) == 3


def test_query_model_retries_a_dropped_connection(ollama_standin):
    ollama_standin.set_fault("disconnect", times=1)
    assert (
        helpers.query_model(helpers.judge_prompt(ENTRIES[1], "model_response"), backoff=0.01) == "0"
    )
    assert len(ollama_standin.chat_requests) == 2


def test_error_line_in_the_stream_is_a_clear_error(ollama_standin):
    ollama_standin.set_fault("error-mid-stream", times=1)
    with pytest.raises(
        helpers.JudgeError, match="failed while answering: an error was encountered"
    ):
        helpers.query_model(helpers.judge_prompt(ENTRIES[0], "model_response"))


def test_slow_reply_times_out_with_advice_and_succeeds_with_patience(ollama_standin):
    ollama_standin.set_fault("slow", delay=0.6)
    with pytest.raises(helpers.JudgeError, match="larger timeout"):
        helpers.query_model("Hi", timeout=0.2, retries=1, backoff=0.01)
    prompt = helpers.judge_prompt(ENTRIES[2], "model_response")
    assert helpers.query_model(prompt, timeout=5) == "67"


def test_reply_without_number(ollama_standin):
    ollama_standin.set_fault("no-number")
    assert helpers.query_model("Hi") == NO_NUMBER_REPLY
    assert helpers.parse_score(NO_NUMBER_REPLY) is None


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
        ("-5", None),
        ("85.5", None),
        ("", None),
        ("Excellent response!", None),
        (NO_NUMBER_REPLY, None),
    ],
)
def test_parse_score(reply, score):
    assert helpers.parse_score(reply) == score


def test_score_summary():
    summary = helpers.score_summary([100, 0, 67, None, 95, 9])
    assert summary["entries"] == 6 and summary["scored"] == 5 and summary["unreadable"] == 1
    assert summary["average"] == pytest.approx((100 + 0 + 67 + 95 + 9) / 5)
    assert summary["histogram"] == [2, 0, 0, 0, 0, 0, 1, 0, 0, 2]


# -- generate_model_scores ---------------------------------------------------------


def test_generate_model_scores_without_file_is_the_books(ollama_standin):
    assert helpers.generate_model_scores(ENTRIES, "model_response") == EXPECTED
    assert len(ollama_standin.chat_requests) == len(ENTRIES)


def test_scores_file_keeps_prompt_reply_score_and_judge(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    scores = helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    assert scores == EXPECTED
    record = json.loads(path.read_text())
    assert record["json_key"] == "model_response"
    assert record["judge"] == {
        "model": "llama3",
        "tag": "llama3:latest",
        "digest": MODELS[0]["digest"],
        "details": MODELS[0]["details"],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    (run,) = record["runs"]
    assert run["run"] == 0 and run["ollama_version"] == ollama_standin.version
    assert run["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert [e["index"] for e in run["entries"]] == [0, 1, 2]
    assert [e["score"] for e in run["entries"]] == EXPECTED
    assert [e["reply"] for e in run["entries"]] == ["100", "0", "67"]
    assert run["entries"][2]["prompt"] == helpers.judge_prompt(ENTRIES[2], "model_response")
    assert helpers.load_scores(path) == EXPECTED


def test_unreadable_replies_are_kept_and_counted(ollama_standin, tmp_path, capsys):
    ollama_standin.set_fault("no-number", times=1)
    path = tmp_path / "scores.json"
    assert (
        helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path) == EXPECTED[1:]
    )
    assert "Could not convert score" in capsys.readouterr().out
    first = json.loads(path.read_text())["runs"][0]["entries"][0]
    assert first["reply"] == NO_NUMBER_REPLY and first["score"] is None
    assert helpers.score_summary(helpers.load_scores(path))["unreadable"] == 1


def test_interrupted_scoring_resumes_without_asking_again(ollama_standin, tmp_path, monkeypatch):
    entries = ENTRIES * 3  # 9 entries
    path = tmp_path / "scores.json"
    real_query, calls = helpers.query_model, []

    def interrupted_query(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the student stops the cell
        calls.append(1)
        return real_query(*args, **kwargs)

    monkeypatch.setattr(helpers, "query_model", interrupted_query)
    with pytest.raises(KeyboardInterrupt):
        helpers.generate_model_scores(entries, "model_response", scores_path=path)
    saved = json.loads(path.read_text())["runs"][0]["entries"]
    assert [e["score"] for e in saved] == (EXPECTED * 3)[:4]
    monkeypatch.setattr(helpers, "query_model", real_query)

    asked_before = len(ollama_standin.chat_requests)
    scores = helpers.generate_model_scores(entries, "model_response", scores_path=path)
    assert scores == EXPECTED * 3
    assert len(ollama_standin.chat_requests) - asked_before == 5  # only the 5 not yet scored

    asked_before = len(ollama_standin.chat_requests)
    assert (
        helpers.generate_model_scores(entries, "model_response", scores_path=path) == EXPECTED * 3
    )
    assert len(ollama_standin.chat_requests) == asked_before  # all done: nothing asked


def test_changed_response_is_asked_again(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    changed = [dict(e) for e in ENTRIES]
    changed[1]["model_response"] = "red"
    asked_before = len(ollama_standin.chat_requests)
    assert helpers.generate_model_scores(changed, "model_response", scores_path=path) == [
        100,
        100,
        67,
    ]
    assert len(ollama_standin.chat_requests) - asked_before == 1


def test_runs_are_kept_apart(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path, run=0)
    ollama_standin.set_fault("no-number", times=1)
    helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path, run=1)
    assert helpers.load_scores(path, run=0) == EXPECTED
    assert helpers.load_scores(path, run=1) == [None] + EXPECTED[1:]
    with pytest.raises(KeyError, match="no run 2"):
        helpers.load_scores(path, run=2)


def test_another_judge_starts_a_new_file(tmp_path, monkeypatch):
    path = tmp_path / "scores.json"
    with OllamaStandIn() as first:
        monkeypatch.setenv("OLLAMA_HOST", first.url)
        helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    newer = [dict(MODELS[0], digest="a" * 64)]
    with OllamaStandIn(models=newer) as second:
        monkeypatch.setenv("OLLAMA_HOST", second.url)
        helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path)
        assert len(second.chat_requests) == len(ENTRIES)  # nothing reused from the old judge
    assert json.loads(path.read_text())["judge"]["digest"] == "a" * 64
    old = json.loads((tmp_path / "scores.previous.json").read_text())
    assert old["judge"]["digest"] == MODELS[0]["digest"]


def test_error_while_scoring_keeps_what_was_scored(ollama_standin, tmp_path):
    path = tmp_path / "scores.json"
    helpers.generate_model_scores(ENTRIES[:1], "model_response", scores_path=path)
    ollama_standin.set_fault("error-mid-stream")
    with pytest.raises(helpers.JudgeError):
        helpers.generate_model_scores(ENTRIES, "model_response", scores_path=path)
    assert helpers.load_scores(path) == EXPECTED[:1]


def test_entries_without_responses_are_refused_before_asking(ollama_standin):
    entries = [dict(ENTRIES[0]), {k: v for k, v in ENTRIES[1].items() if k != "model_response"}]
    with pytest.raises(KeyError, match="entry 1.*07_extracting_responses"):
        helpers.generate_model_scores(entries, "model_response")
    assert ollama_standin.chat_requests == []
