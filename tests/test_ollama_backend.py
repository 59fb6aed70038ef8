"""The Ollama adapter, over real HTTP, against a local test double answering with Ollama's documented JSON."""

from __future__ import annotations

import asyncio

import pytest
from kvbatch.serve.backends import get_backend, known_backends
from kvbatch.errors import (
    ContextOverflowError,
    NotFoundError,
    OutOfMemoryError,
    ServerBusyError,
    ServerGoneError,
    UserInputError,
)
from ollama_double import MODEL


def _run(coro):
    return asyncio.run(coro)


async def _chat(url: str, content: str, model: str = MODEL, **backend_options):
    backend = get_backend("ollama", url, model=model, **backend_options)
    try:
        return await backend.chat(
            {
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 4,
                "temperature": 0,
                "model": "gpt-4o-mini",
            }
        )
    finally:
        await backend.aclose()


def test_chat_is_normalized_and_sends_truncate_false_and_num_ctx(ollama_double):
    result = _run(_chat(ollama_double.url, "one two three four five", num_ctx=2048))
    assert result.text == "ok ok ok ok"
    assert result.finish_reason == "length"
    assert result.prompt_tokens == 5
    assert result.cached_prompt_tokens == 2  # from prompt_eval_cached_count
    assert result.completion_tokens == 4
    assert result.timings["prompt_eval_duration_ns"] == 2_000_000
    sent = ollama_double.double.received[-1]
    assert sent["truncate"] is False
    assert sent["model"] == MODEL  # a foreign model name in the body is replaced
    assert sent["options"] == {"num_predict": 4, "temperature": 0, "num_ctx": 2048}
    assert result.response_body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2


def test_cached_tokens_unknown_when_server_does_not_say(ollama_double):
    ollama_double.double.send_cached_count = False
    result = _run(_chat(ollama_double.url, "one two"))
    assert result.cached_prompt_tokens is None
    assert "prompt_tokens_details" not in result.response_body["usage"]


def test_over_long_prompt_is_an_error_not_a_silent_cut(ollama_double):
    with pytest.raises(ContextOverflowError, match="exceeds the context length"):
        _run(_chat(ollama_double.url, "word " * 50, num_ctx=16))


@pytest.mark.parametrize(
    ("mode", "error"), [("oom", OutOfMemoryError), ("crash", ServerGoneError), ("busy", ServerBusyError)]
)
def test_errors_are_classified(ollama_double, mode, error):
    ollama_double.double.mode = mode
    with pytest.raises(error) as caught:
        _run(_chat(ollama_double.url, "hi"))
    assert caught.value.server_message  # the server's own message is kept


def test_unknown_model_is_not_found(ollama_double):
    with pytest.raises(NotFoundError, match="not found"):
        _run(_chat(ollama_double.url, "hi", model="nope:1b"))


def test_connection_refused_is_server_gone():
    with pytest.raises(ServerGoneError, match="cannot reach Ollama"):
        _run(_chat("http://127.0.0.1:9", "hi"))


def test_ps_and_show(ollama_double):
    async def go():
        backend = get_backend("ollama", ollama_double.url, model=MODEL, num_ctx=8192)
        try:
            await backend.chat({"messages": [{"role": "user", "content": "hi"}]})
            return await backend.loaded_models(), await backend.model_info(), await backend.health()
        finally:
            await backend.aclose()

    loaded, info, healthy = _run(go())
    assert healthy
    assert loaded[0].context_length == 8192
    assert loaded[0].size_bytes == 600_000_000 + 3 * 1024 * 8192
    assert info["gemma3.block_count"] == 18


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(UserInputError, match="known backends: ollama, openai"):
        get_backend("tgi", "http://127.0.0.1:1")
    assert known_backends() == ["ollama", "openai"]
