"""Fixtures for the unit tests (the session set-up is in the root conftest.py)."""

import pytest
from ollama_standin import OllamaStandIn


@pytest.fixture
def ollama_standin(monkeypatch):
    """A fresh stand-in Ollama server for one test, with OLLAMA_HOST pointing at it."""
    with OllamaStandIn() as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        yield server
