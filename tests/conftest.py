"""Shared fixtures: the real embedded llama-server (tests use it wherever it can run) and the Ollama test double."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the fault-injecting server

from kvbatch.serve.config import ServerConfig  # noqa: E402
from kvbatch.serve.server import EmbeddedServer  # noqa: E402
from ollama_double import OllamaDouble, RunningDouble  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_leftover_kvbatch():
    """A test that fails mid-way leaves no `kvbatch` it started running into the next test."""
    from batch_helpers import stop_started

    yield
    stop_started()


@pytest.fixture(scope="session")
def embedded_server():
    """One real llama-server on Gemma 3 270M for the tests that only talk to it."""
    with EmbeddedServer(ServerConfig(context_tokens=8192, parallel_slots=2)) as server:
        yield server


@pytest.fixture
def ollama_double():
    double = OllamaDouble()
    with RunningDouble(double) as running:
        yield running


@pytest.fixture
def in_tmp_repo(tmp_path, monkeypatch):
    """Write data/ and reports/ under a temporary folder (the notebooks are found in the checkout)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def kvbatch_command() -> list[str]:
    return [sys.executable, "-m", "kvbatch.cli"]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KVBATCH_GPU_TESTS") == "1":
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU; opt in with KVBATCH_GPU_TESTS=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
