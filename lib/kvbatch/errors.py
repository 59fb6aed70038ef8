"""The typed errors the executor acts on.

One place (`classify_http_error`) turns a server's status code and message into one of these, so the
backends agree on what "out of memory" or "too long" means whichever server said it.
"""

from __future__ import annotations

import re


class KvbatchError(Exception):
    """Root of every error kvbatch raises on purpose. Keeps the HTTP status and the server's own message."""

    def __init__(self, message: str, *, status_code: int | None = None, server_message: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.server_message = server_message if server_message is not None else message


class UserInputError(KvbatchError):
    """A mistake in what the user gave us (a file, a flag). The CLI prints it as one sentence."""


class BadRequestError(KvbatchError):
    """The server refused the request itself (HTTP 400/422): retrying the same body cannot help."""


class ContextOverflowError(BadRequestError):
    """The prompt (plus room to answer) does not fit the slot's context. An error for that request alone."""


class NotFoundError(KvbatchError):
    """The model or endpoint does not exist on that server (HTTP 404)."""


class ServerBusyError(KvbatchError):
    """The server's queue is full (HTTP 503 / 429): slow down and retry."""


class ServerGoneError(KvbatchError):
    """The server crashed, was killed or cannot be reached: wait for health, restart if we own it, retry."""


class OutOfMemoryError(ServerGoneError):
    """The server ran out of memory (at load or while serving). Restart smaller, then retry."""


class ServerStartError(KvbatchError):
    """A server we manage did not come up. The message quotes its own failure line."""

    def __init__(self, message: str, *, failure_line: str | None = None, out_of_memory: bool = False) -> None:
        super().__init__(message, server_message=failure_line)
        self.failure_line = failure_line
        self.out_of_memory = out_of_memory


_OOM_MARKERS = (
    "out of memory",
    "insufficient memory",
    "failed to allocate",
    "cudamalloc failed",
    "requires more system memory",
    "unable to allocate",
    "cannot allocate memory",
    "bad_alloc",
    "thread creation failed",
)
_OVERFLOW_MARKERS = (
    "exceeds the available context size",
    "context length",
    "context size",
    "too long",
    "maximum context",
    "exceed_context_size",
)


def looks_like_oom(text: str) -> bool:
    """True when a server message or log line says an allocation failed."""
    lowered = text.lower()
    return any(marker in lowered for marker in _OOM_MARKERS) or re.search(r"\boom", lowered) is not None


def classify_http_error(status_code: int, message: str, *, url: str = "") -> KvbatchError:
    """Map an HTTP error reply to the kvbatch error the executor knows how to handle."""
    lowered = message.lower()
    where = f" from {url}" if url else ""
    text = f"HTTP {status_code}{where}: {message}"
    if status_code in (400, 413, 422) and any(marker in lowered for marker in _OVERFLOW_MARKERS):
        return ContextOverflowError(text, status_code=status_code, server_message=message)
    if status_code == 404:
        return NotFoundError(text, status_code=status_code, server_message=message)
    if status_code in (429, 503):
        return ServerBusyError(text, status_code=status_code, server_message=message)
    if status_code >= 500:
        if looks_like_oom(message):
            return OutOfMemoryError(text, status_code=status_code, server_message=message)
        return ServerGoneError(text, status_code=status_code, server_message=message)
    return BadRequestError(text, status_code=status_code, server_message=message)
