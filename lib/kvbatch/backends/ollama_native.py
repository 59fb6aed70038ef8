"""Ollama's native API (`/api/chat`, `/api/ps`, `/api/show`) through the official `ollama` client.

Tested against a local HTTP test double that answers with Ollama's documented JSON (Ollama cannot be
installed on the project's machines); see tests/ollama_double.py.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import ollama
from pydantic import ConfigDict

from kvbatch.backends import register_backend
from kvbatch.backends.base import Backend, ChatResult, ServerMemory
from kvbatch.errors import KvbatchError, ServerGoneError, classify_http_error

# OpenAI body keys that Ollama takes inside `options`, with Ollama's name for each.
_OPTION_NAMES = {
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_p": "min_p",
}


class _ChatReply(ollama.ChatResponse):
    """Keeps fields newer servers add (`prompt_eval_cached_count`, from v0.33) that the client's model drops."""

    model_config = ConfigDict(extra="allow")


def ollama_body(
    body: dict[str, Any], model: str, num_ctx: int | None, keep_alive: str | float | None
) -> dict[str, Any]:
    """Translate an OpenAI chat body to an `/api/chat` body; send only what was set."""
    options: dict[str, Any] = dict(body.get("options") or {})
    for openai_key, ollama_key in _OPTION_NAMES.items():
        if body.get(openai_key) is not None:
            options[ollama_key] = body[openai_key]
    if num_ctx is not None:
        options.setdefault("num_ctx", num_ctx)
    request: dict[str, Any] = {
        "model": model,
        "messages": body["messages"],
        "stream": False,
        # Without this Ollama silently cuts a prompt longer than num_ctx; with it, HTTP 400.
        "truncate": False,
    }
    if options:
        request["options"] = options
    if keep_alive is not None:
        request["keep_alive"] = keep_alive
    return request


def as_openai_completion(reply: dict[str, Any], cached: int | None) -> dict[str, Any]:
    """An Ollama chat reply as an OpenAI `chat.completion` object, so batch output is uniform."""
    prompt = reply.get("prompt_eval_count")
    completion = reply.get("eval_count")
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": (prompt or 0) + (completion or 0),
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "object": "chat.completion",
        "model": reply.get("model"),
        "created": int(time.time()),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": (reply.get("message") or {}).get("content", "")},
                "finish_reason": reply.get("done_reason"),
            }
        ],
        "usage": usage,
    }


@register_backend("ollama")
class OllamaBackend(Backend):
    """Ollama's native API. `num_ctx` is sent with every request: changing it makes Ollama reload the model."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        num_ctx: int | None = None,
        keep_alive: str | float | None = "30m",
        request_timeout_s: float = 600.0,
    ) -> None:
        super().__init__(base_url, model)
        self.num_ctx = num_ctx
        self.keep_alive = keep_alive
        self._timeout_s = request_timeout_s
        self._client: ollama.AsyncClient | None = None

    def _ollama(self) -> ollama.AsyncClient:
        if self._client is None:
            self._client = ollama.AsyncClient(host=self.base_url, timeout=self._timeout_s)
        return self._client

    async def _call(self, what: str, coro_factory):
        try:
            return await coro_factory()
        except ollama.ResponseError as exc:
            status = exc.status_code if exc.status_code and exc.status_code > 0 else 500
            raise classify_http_error(status, str(exc.error), url=f"{self.base_url}{what}") from exc
        except (ConnectionError, httpx.TransportError) as exc:
            raise ServerGoneError(
                f"cannot reach Ollama at {self.base_url}{what} ({type(exc).__name__}: {exc}); "
                "is `ollama serve` running?"
            ) from exc

    async def chat(self, body: dict[str, Any], *, timeout_s: float | None = None) -> ChatResult:
        model = self.model or body.get("model")
        if not model:
            raise KvbatchError("the Ollama backend needs a model name (--model)")
        request = ollama_body(body, model, self.num_ctx, self.keep_alive)
        started = time.perf_counter()
        # The public chat() has no `truncate` argument, so the documented body is posted through the client's
        # own request path; errors and connection handling stay the client's.
        reply_model = await self._call(
            "/api/chat", lambda: self._ollama()._request(_ChatReply, "POST", "/api/chat", json=request)
        )
        latency_s = time.perf_counter() - started
        reply = reply_model.model_dump()
        extra = reply_model.model_extra or {}
        if extra.get("error"):
            raise classify_http_error(500, str(extra["error"]), url=f"{self.base_url}/api/chat")
        cached = extra.get("prompt_eval_cached_count")
        cached = int(cached) if cached is not None else None
        timings = {
            key: reply.get(key)
            for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
            if reply.get(key) is not None
        }
        return ChatResult(
            text=(reply.get("message") or {}).get("content") or "",
            finish_reason=reply.get("done_reason"),
            prompt_tokens=reply.get("prompt_eval_count"),
            cached_prompt_tokens=cached,
            completion_tokens=reply.get("eval_count"),
            latency_s=latency_s,
            timings={f"{key}_ns": value for key, value in timings.items()},
            model=reply.get("model"),
            response_body=as_openai_completion(reply, cached),
        )

    async def health(self) -> bool:
        try:
            await self._ollama()._request_raw("GET", "/api/version")
        except (ConnectionError, httpx.TransportError, ollama.ResponseError):
            return False
        return True

    async def loaded_models(self) -> list[ServerMemory]:
        """`/api/ps`: `size`, `size_vram` and the per-slot `context_length` of each loaded model."""
        reply = await self._call("/api/ps", lambda: self._ollama().ps())
        return [
            ServerMemory(
                model=entry.model or entry.name or "",
                size_bytes=int(entry.size or 0),
                vram_bytes=int(entry.size_vram or 0),
                context_length=entry.context_length,
            )
            for entry in reply.models
        ]

    async def model_info(self, model: str | None = None) -> dict[str, Any]:
        """`/api/show` `model_info`: the same architecture keys a GGUF file holds."""
        name = model or self.model
        if not name:
            raise KvbatchError("the Ollama backend needs a model name (--model)")
        reply = await self._call("/api/show", lambda: self._ollama().show(name))
        return dict(reply.modelinfo or {})

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client._client.aclose()
        self._client = None
