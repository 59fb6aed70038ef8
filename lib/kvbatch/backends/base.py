"""The one small interface every backend implements, and the normalized result they all return.

Requests travel in the OpenAI chat-completions shape (`messages`, `max_tokens`, `temperature`, ...), the
shape batch files already use; each backend translates it to its server's dialect and back.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChatResult:
    """What every backend returns for one chat request, whatever the server.

    `cached_prompt_tokens` is None when the server does not say (never a guess): Ollama's
    `prompt_eval_count` meant different things in different versions.
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    cached_prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    timings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    response_body: dict[str, Any] = field(default_factory=dict)
    """The reply as an OpenAI `chat.completion` object (the server's own body where it already is one)."""


@dataclass
class ServerMemory:
    """What a server says about the memory of the models it holds (Ollama's /api/ps)."""

    model: str
    size_bytes: int
    vram_bytes: int
    context_length: int | None


class Backend(abc.ABC):
    """A chat server reached over HTTP. Async core; callers own the event loop.

    Subclasses register with `@register_backend("name")`, the same way a third party would add one.
    """

    name: str = ""

    def __init__(self, base_url: str, model: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model

    @abc.abstractmethod
    async def chat(self, body: dict[str, Any], *, timeout_s: float | None = None) -> ChatResult:
        """Send one chat request (OpenAI body) and return the normalized result, or raise a KvbatchError."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the server answers and is ready to serve."""

    async def tokenize(self, text: str) -> list[int] | None:
        """Token ids from the server's own tokenizer, or None when this server has no such endpoint."""
        return None

    async def loaded_models(self) -> list[ServerMemory]:
        """Memory the server reports for its loaded models; empty when it reports none."""
        return []

    async def aclose(self) -> None:  # noqa: B027 (optional hook: backends without connections need nothing)
        """Release connections."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
