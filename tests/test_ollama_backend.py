"""The Ollama adapter's translation of requests, and its reading of Ollama's error replies (a small double that
answers with the documented error shapes; behaviour on a real server is tested on the emulator)."""

from __future__ import annotations

import asyncio

import pytest
from kvbatch.errors import (
    AuthError,
    MalformedReplyError,
    NotFoundError,
    OutOfMemoryError,
    ServerBusyError,
    ServerFaultError,
    ServerGoneError,
    UserInputError,
)
from kvbatch.serve.backends import get_backend, known_backends
from kvbatch.serve.backends.ollama_native import ollama_body
from ollama_double import MODEL


async def _chat(url: str, model: str = MODEL):
    async with get_backend("ollama", url, model=model) as backend:
        return await backend.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


@pytest.mark.parametrize(
    ("mode", "error", "words"),
    [
        ("oom", OutOfMemoryError, "cudaMalloc failed"),
        ("killed", OutOfMemoryError, "signal: killed"),  # the kernel's OOM killer ended the runner: back off
        ("too-big", OutOfMemoryError, "requires more system memory"),
        ("crash", ServerFaultError, "unexpectedly stopped"),  # up and failing: the breaker tells whose fault
        ("busy", ServerBusyError, "server busy"),
        ("unauthorized", AuthError, "check the API key"),
        ("error-in-200", ServerFaultError, "unexpected EOF"),
        ("not-json", MalformedReplyError, "not JSON"),
    ],
)
def test_ollamas_errors_are_classified(ollama_double, mode, error, words):
    ollama_double.double.mode = mode
    with pytest.raises(error, match=words) as caught:
        asyncio.run(_chat(ollama_double.url))
    assert caught.value.server_message


def test_an_unknown_model_is_not_found_with_a_pull_hint(ollama_double):
    with pytest.raises(NotFoundError, match=r"pull it first \(`ollama pull nope:1b`\)"):
        asyncio.run(_chat(ollama_double.url, model="nope:1b"))


def test_connection_refused_is_server_gone():
    with pytest.raises(ServerGoneError, match="is `ollama serve` running"):
        asyncio.run(_chat("http://127.0.0.1:9"))


def test_openai_fields_are_translated_not_dropped():
    body = {
        "messages": [{"role": "system", "content": "S"},
                     {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}],
        "max_tokens": 7, "temperature": 0.2, "top_p": 0.9, "seed": 4, "stop": ["\n"],
        "response_format": {"type": "json_object"}, "model": "gpt-4o-mini",
    }  # fmt: skip
    sent = ollama_body(body, MODEL, 4096, "30m")
    assert sent["messages"][1]["content"] == "a b"
    assert sent["format"] == "json" and sent["truncate"] is False and sent["stream"] is False
    assert sent["options"] == {"num_predict": 7, "temperature": 0.2, "top_p": 0.9, "seed": 4, "stop": ["\n"],
                               "num_ctx": 4096}  # fmt: skip
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}}
    assert ollama_body({**body, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
                       MODEL, None, None)["format"] == schema  # fmt: skip


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(UserInputError, match="known backends: ollama, openai"):
        get_backend("tgi", "http://127.0.0.1:1")
    assert known_backends() == ["ollama", "openai"]
