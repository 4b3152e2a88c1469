"""The judge's waits are bounded as a whole, and the book's query_model fails readably.

Each test starts a hostile server on a free port of 127.0.0.1 (a real socket, a real
thread) and calls the course's code against it as notebook 09 does: headers sent one
byte per 0.5 s, a body that trickles without end, a 500, a connection reset, a reply
that is not JSON.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

import helpers
from course import judge


class HostileServer:
    """Accepts connections on 127.0.0.1 and answers each with `behave(connection)`."""

    def __init__(self, behave):
        self.behave = behave
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection):
        with connection:
            connection.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    request += connection.recv(4096)
                head, _, body = request.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(body) < length:
                    body += connection.recv(4096)
                self.behave(connection, self.stop)
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.listener.close()


def trickle(data: bytes, delay: float):
    def behave(connection, stop):
        for byte in data:
            if stop.is_set():
                return
            connection.sendall(bytes([byte]))
            time.sleep(delay)

    return behave


def headers_one_byte_per_half_second():
    # a header line without end: a server that never finishes its headers
    return trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200, 0.5)


def endless_body():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n"
    chunk = json.dumps({"message": {"role": "assistant", "content": "8"}, "done": False})

    def behave(connection, stop):
        connection.sendall(head)
        trickle((chunk + "\n").encode() * 1000, 0.05)(connection, stop)

    return behave


def answer(status: str, body: bytes, content_type: str = "application/json"):
    def behave(connection, stop):
        connection.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )

    return behave


def reset(connection, stop):
    # SO_LINGER with a zero timeout: close() sends RST, the client sees a reset
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- headers count against the deadline ------------------------------------------------


def test_query_model_deadline_covers_trickled_headers():
    with HostileServer(headers_one_byte_per_half_second()) as server:
        start = time.monotonic()
        with pytest.raises(judge.JudgeError, match="did not answer in time"):
            judge.query_model("hi", url=server.url + "/api/chat", max_seconds=5, retries=0)
        took = time.monotonic() - start
    assert took < 7, f"query_model(max_seconds=5) waited {took:.1f} s"


def test_ollama_status_deadline_covers_trickled_headers():
    with HostileServer(headers_one_byte_per_half_second()) as server:
        start = time.monotonic()
        with pytest.raises(judge.JudgeError, match="waited at most 3 s"):
            judge.ollama_status("llama3", host=server.url, timeout=3)
        took = time.monotonic() - start
    # two requests at most (version, tags), each bounded by 3 s; the first one fails
    assert took < 4.5, f"ollama_status(timeout=3) waited {took:.1f} s"


# -- the book's query_model in notebook 09's demo cells ---------------------------------


def book_query(url, **limits):
    with judge.bounded(url=url + "/api/chat", **limits):
        return helpers.query_model("What do Llamas eat?", "llama3", url=url + "/api/chat")


def test_book_query_model_is_bounded_against_an_endless_answer():
    with HostileServer(endless_body()) as server:
        start = time.monotonic()
        with pytest.raises(judge.JudgeError, match="did not answer in time") as info:
            book_query(server.url, timeout=2, max_seconds=3)
        took = time.monotonic() - start
    assert took < 5, f"the book's query_model waited {took:.1f} s"
    assert "bounded(timeout=900, max_seconds=1800)" in str(info.value)


def test_book_query_model_is_bounded_against_trickled_headers():
    with HostileServer(headers_one_byte_per_half_second()) as server:
        start = time.monotonic()
        with pytest.raises(judge.JudgeError, match="did not answer in time"):
            book_query(server.url, timeout=2, max_seconds=3)
        assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("behave", "expected"),
    [
        (
            answer("500 Internal Server Error", b'{"error": "out of memory"}'),
            "HTTP 500: out of memory",
        ),
        (reset, "connection to the judge"),
        (answer("200 OK", b"<html>not ollama</html>\n", "text/html"), "not like Ollama's chat API"),
        (answer("404 Not Found", b'{"error": "model \\"llama3\\" not found"}'), "ollama pull"),
    ],
    ids=["http-500", "reset", "not-json", "model-missing"],
)
def test_book_query_model_failures_end_in_a_message(behave, expected):
    with HostileServer(behave) as server:
        with pytest.raises(judge.JudgeError, match=expected) as info:
            book_query(server.url, timeout=5, max_seconds=10)
    message = str(info.value)
    assert server.url in message
    assert "run the cell again" in message or "OLLAMA_HOST" in message


def test_bounded_restores_urllib_and_passes_answers_through(ollama_standin):
    import urllib.request

    before = urllib.request._opener
    with judge.bounded(url=ollama_standin.url + "/api/chat"):
        reply = helpers.query_model("What do Llamas eat?", url=ollama_standin.url + "/api/chat")
    assert reply  # the stand-in's fixed sentence for a prompt that is not a judge prompt
    assert urllib.request._opener is before


def test_the_stand_in_is_labelled_as_such_and_a_real_judge_by_its_tag(ollama_standin):
    status = judge.ollama_status("llama3")
    assert judge.is_standin(status)
    assert "stand-in" in judge.judge_label(status)
    real = {**status, "digest": "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1"}
    assert not judge.is_standin(real)
    assert judge.judge_label(real) == "llama3:latest"
