"""kvbatch: measure a local LLM server's KV-cache limits, plan from them, and run huge batches safely."""

from kvbatch.errors import (
    BadRequestError,
    ContextOverflowError,
    KvbatchError,
    NotFoundError,
    OutOfMemoryError,
    ServerBusyError,
    ServerGoneError,
)

__version__ = "0.1.0"

__all__ = [
    "BadRequestError",
    "ContextOverflowError",
    "KvbatchError",
    "NotFoundError",
    "OutOfMemoryError",
    "ServerBusyError",
    "ServerGoneError",
    "__version__",
]
