"""The typed errors the executor acts on.

One place (`classify_http_error`) turns a server's status code and message into one of these, so the
backends agree on what "out of memory" or "too long" means whichever server said it.
"""

from __future__ import annotations

import re


class KvbatchError(Exception):
    """Root of every error kvbatch raises on purpose. Keeps the HTTP status and the server's own message."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        server_message: str | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.server_message = server_message if server_message is not None else message
        self.details = details or {}
        """Figures a failed request's line in errors.jsonl keeps beside the message (e.g. both token counts)."""


class UserInputError(KvbatchError):
    """A mistake in what the user gave us (a file, a flag). The CLI prints it as one sentence."""


class BadRequestError(KvbatchError):
    """The server refused the request itself (HTTP 400/422): retrying the same body cannot help."""


class ContextOverflowError(BadRequestError):
    """The prompt (plus room to answer) does not fit the slot's context. An error for that request alone."""


class TruncatedPromptError(BadRequestError):
    """The server counted far fewer prompt tokens than the request holds: it cut the prompt (Ollama does so
    silently unless `truncate: false`, and older servers ignore that). The answer is not kept as a success."""


class FillError(KvbatchError):
    """A measurement fill the server would not take at any size tried (each refused as too long, or cut): that
    step is recorded as "could not fill" with this reason; the measurement goes on."""


class NotFoundError(KvbatchError):
    """The model or endpoint does not exist on that server (HTTP 404). Stops the run: no request can succeed."""


class AuthError(KvbatchError):
    """The server refused our credentials (HTTP 401/403). Stops the run at once and records nothing as failed:
    a missing or expired key must not burn the whole input."""


class ServerLimitError(KvbatchError):
    """The server will not give what the plan needs (a context capped below the planned one). Stops the run."""


class TransientError(KvbatchError):
    """Waiting will serve the request: back off and retry without spending one of its attempts."""


class ServerBusyError(TransientError):
    """The server's queue is full (HTTP 503 / 429): slow down and retry."""


class MalformedReplyError(TransientError):
    """The server answered 2xx with a body that is not the expected JSON (a proxy page, a cut-off reply)."""


class ServerGoneError(TransientError):
    """The server crashed, was killed or cannot be reached: wait for health, restart if we own it, retry."""


class ServerUnreachableError(ServerGoneError):
    """Nothing accepted the connection: the server was already down when the request started, so the request
    cannot be to blame for it."""


class ConnectionDroppedError(ServerGoneError):
    """The connection was dropped mid-request: a crash, or a proxy or network hiccup. Recovery finds out which
    (a server that is still up and healthy did not crash: the request is retried, nothing charged)."""


class RequestTimeoutError(TransientError):
    """No reply within the request's time limit (`--request-timeout`). The server may be up and slow: a timeout
    is not a crash. Waited out while other requests succeed; charged to a request only when others succeed
    while it times out."""


class ServerFaultError(TransientError):
    """The server is up and answered 5xx (vLLM's "EngineCore encountered an issue", Ollama's "model runner has
    unexpectedly stopped", a CUDA error on every request). One request failing while others succeed is that
    request's fault; many different requests failing with nothing succeeding in between is the server's."""


class OutOfMemoryError(ServerGoneError):
    """The server ran out of memory (at load or while serving). Restart smaller, then retry."""


class ServerStartError(KvbatchError):
    """A server we manage did not come up. The message quotes its own failure line."""

    def __init__(
        self,
        message: str,
        *,
        failure_line: str | None = None,
        out_of_memory: bool = False,
        exit_signal: int | None = None,
    ) -> None:
        super().__init__(message, server_message=failure_line)
        self.failure_line = failure_line
        self.out_of_memory = out_of_memory
        self.exit_signal = exit_signal
        """The signal that killed the server (SIGILL: built for instructions this CPU does not run)."""


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
    "signal: killed",  # Ollama: the kernel's OOM killer ended its runner
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
    if status_code in (401, 403):
        return AuthError(
            f"{text}; check the API key (kvbatch reads it from the KVBATCH_API_KEY environment variable)",
            status_code=status_code,
            server_message=message,
        )
    if status_code == 404:
        missing_model = "not found" in lowered and "model" in lowered
        hint = f"; pull it first (`ollama pull {_model_in(message)}`)" if missing_model else ""
        return NotFoundError(text + hint, status_code=status_code, server_message=message)
    if status_code in (408, 429, 502, 503, 504):
        return ServerBusyError(text, status_code=status_code, server_message=message)
    if looks_like_oom(message):  # llama-server answers 400 when serving a request threw std::bad_alloc
        return OutOfMemoryError(text, status_code=status_code, server_message=message)
    if status_code >= 500:
        return ServerFaultError(text, status_code=status_code, server_message=message)
    return BadRequestError(text, status_code=status_code, server_message=message)


def _model_in(message: str) -> str:
    match = re.search(r"model ['\"]?([\w.:/-]+)['\"]? not found", message)
    return match.group(1) if match else "MODEL"


EXIT_DONE = 0
EXIT_SOME_FAILED = 1
EXIT_WRONG_INPUT = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = """exit codes:
  0    every request done
  1    done, but some requests failed for good (errors.jsonl)
  2    the input or the command is wrong (a bad line, a flag, a key, a model the server lacks): fix it first
  3    stopped with nothing lost (the server down or failing past --max-wait): run the same command again
  130  interrupted (Ctrl-C): run the same command again to resume"""


def exit_code(error: KvbatchError) -> int:
    """What a script can act on: 3 when running the same command again later may succeed (the server was down or
    failing), 2 when something given to kvbatch must change first."""
    if isinstance(error, OutOfMemoryError):  # out of memory at the least layout: the budget or KV type must change
        return EXIT_WRONG_INPUT
    return EXIT_STOPPED if isinstance(error, TransientError) else EXIT_WRONG_INPUT
