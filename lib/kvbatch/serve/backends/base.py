"""The one small interface every backend implements, and the normalized results they all return.

Requests travel in the OpenAI chat-completions shape (`messages`, `max_tokens`, `temperature`, ...), the shape batch
files already use; each backend translates it to its server's dialect and back. Only backends speak HTTP to a
server: memory, tokens, health, limits and model information are all asked through this interface.
"""

from __future__ import annotations

import abc
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvbatch import defaults

API_KEY_ENV = "KVBATCH_API_KEY"
"""The environment variable holding an optional API key. It is sent, never written to disk or logs."""


@dataclass
class ChatResult:
    """What every backend returns for one chat request, whatever the server.

    `cached_prompt_tokens` is None when the server does not say (never a guess): Ollama's `prompt_eval_count`
    meant different things in different versions.
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
    prompt_tokens_exclude_cached: bool = False
    """`prompt_tokens` leaves out the tokens served from the prefix cache, and how many those were is not said
    (Ollama v0.30-v0.32): whoever compares it with the request's size must count the shared prefix as cached."""


@dataclass
class ServerMemory:
    """What a server says about the memory of a model it holds (Ollama's /api/ps)."""

    model: str
    size_bytes: int
    vram_bytes: int
    context_length: int | None

    @property
    def offloaded_to_cpu(self) -> bool:
        """Ollama moved layers to the CPU because the context did not fit the card (it still answers, slower)."""
        return 0 < self.vram_bytes < self.size_bytes


@dataclass
class ServerLimits:
    """A server's own limits, each marked as discovered from the server or assumed."""

    slots: int | None = None
    slot_context_tokens: int | None = None
    max_model_len: int | None = None
    slot_pinning: bool = False
    """The server accepts `id_slot` (llama-server), which keeps each slot's prefix cache warm."""
    server_kind: str = "unknown"
    sources: dict[str, str] = field(default_factory=dict)
    """Field name -> where its value came from ("/props", "/slots", "/v1/models", "assumed")."""

    def describe(self) -> str:
        parts = []
        for name, label in (("slots", "slots"), ("slot_context_tokens", "context per slot"), ("max_model_len", "max")):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{label} {value} [{self.sources.get(name, 'assumed')}]")
        return f"{self.server_kind}: " + (", ".join(parts) if parts else "no limits reported")


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """`http://user:pass@host` -> (`http://host`, (user, pass)): the credentials are used, never shown or saved."""
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    if parts.username is None and parts.password is None:
        return url.rstrip("/"), None
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    clean = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))


def is_local(url: str | None) -> bool:
    """The server runs on this machine (its memory and files are ours to read)."""
    host = urllib.parse.urlsplit(url or "").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def public_url(url: str | None) -> str | None:
    """A URL as it may be written to disk or logs: without `user:pass@`."""
    return split_credentials(url)[0] if url else url


@dataclass(frozen=True)
class BackendOptions:
    """What every backend takes, in one place (each backend's own extras, such as llama-server's slot pinning or
    Ollama's layout, are keyword arguments of its own). The request timeout is held here alone."""

    api_key: str | None = None
    """Sent as `Authorization: Bearer`; default: the KVBATCH_API_KEY environment variable."""
    request_timeout_s: float = defaults.REQUEST_TIMEOUT_S
    """`--request-timeout`: how long one request may take unless a call says otherwise."""
    max_connections: int = defaults.MAX_CONNECTIONS


class Backend(abc.ABC):
    """A chat server reached over HTTP. Async core; callers own the event loop.

    Subclasses register with `@register_backend("name")`, the same way a third party would add one.
    """

    name: str = ""
    refused_fields: ClassVar[dict[str, str]] = {}
    """Request body fields this server cannot honour, with the reason; validation refuses them up front."""
    refused_schema_keywords: ClassVar[dict[str, str]] = {}
    """JSON Schema keywords this server refuses in a `response_format` schema, with the reason: validation names
    them (file, line, where in the schema) before the first request."""
    accepted_fields: ClassVar[frozenset[str] | None] = None
    """The body fields this backend sends or translates; any other is named in the input notes as not sent (None:
    the body goes to the server as it is)."""

    def __init__(self, base_url: str, model: str | None = None, *, options: BackendOptions | None = None) -> None:
        self.base_url, self._credentials = split_credentials(base_url)
        self.model = model
        self.options = options or BackendOptions()
        self.api_key = self.options.api_key or os.environ.get(API_KEY_ENV) or None

    @property
    def request_timeout_s(self) -> float:
        return self.options.request_timeout_s

    def retarget(self, base_url: str) -> None:
        """Point at the same server on a new address (an embedded server restarted on another port)."""
        self.base_url, self._credentials = split_credentials(base_url)
        http = getattr(self, "http", None)
        if http is not None:
            http.base_url = self.base_url

    @abc.abstractmethod
    async def chat(
        self, body: dict[str, Any], *, slot: int | None = None, timeout_s: float | None = None
    ) -> ChatResult:
        """Send one chat request (OpenAI body) and return the normalized result, or raise a KvbatchError. `slot`
        pins it to one of the server's slots where the server allows that (llama-server), else is ignored."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the server answers and is ready to serve."""

    async def tokenize(self, text: str) -> list[int] | None:
        """Token ids from the server's own tokenizer, or None when this server has no such endpoint."""
        return None

    async def loaded_models(self) -> list[ServerMemory]:
        """Memory the server reports for its loaded models; empty when it reports none."""
        return []

    async def model_info(self) -> dict[str, Any] | None:
        """The model's architecture keys (GGUF names), where the server reports them."""
        return None

    async def model_file(self) -> str | None:
        """The GGUF file behind the model when the server names it and it is on this machine."""
        return None

    async def limits(self) -> ServerLimits:
        """Slots, context per slot and the model's maximum length, as far as the server reports them."""
        return ServerLimits(sources={"slots": "assumed"})

    @abc.abstractmethod
    async def fill(self, tokens: int, *, context_tokens: int, max_tokens: int = 4) -> int:
        """Serve one prompt of about `tokens` tokens at `context_tokens` (a measurement's fill request); return the
        prompt tokens the server reports, so the caller can check it was not cut."""

    async def aclose(self) -> None:  # noqa: B027 (optional hook: backends without connections need nothing)
        """Release connections."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
