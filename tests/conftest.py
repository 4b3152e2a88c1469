"""Fixtures shared by the unit tests (the session set-up is in the root conftest.py)."""

import json
from pathlib import Path

import pytest
from ollama_standin import OllamaStandIn

import helpers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    """The GPT-2 tokenizer, built from the shipped files."""
    return helpers.get_tokenizer()


@pytest.fixture(scope="module")
def data() -> list[dict]:
    """The course's 1,100-entry instruction dataset."""
    return json.loads((ROOT / "instruction-data.json").read_text(encoding="utf-8"))


@pytest.fixture
def ollama_standin(monkeypatch):
    """A fresh stand-in Ollama server for one test, with OLLAMA_HOST pointing at it."""
    with OllamaStandIn() as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        yield server
