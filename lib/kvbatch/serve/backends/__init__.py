"""Backends behind one interface, found by name. Only backends speak HTTP to a server; importing this package
imports no HTTP client."""

from __future__ import annotations

import importlib
from typing import Any

from kvbatch.errors import UserInputError
from kvbatch.serve.backends.base import Backend, BackendOptions, ChatResult, ServerLimits, ServerMemory, public_url

_REGISTRY: dict[str, type[Backend]] = {}
_BUILTIN_MODULES = {
    "openai": "kvbatch.serve.backends.openai_compat",
    "ollama": "kvbatch.serve.backends.ollama_native",
}


def register_backend(name: str):
    """Class decorator: make a Backend subclass available under `name`."""

    def decorate(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def known_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def backend_class(name: str) -> type[Backend]:
    """The class registered as `name`; an unknown name lists the known ones."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise UserInputError(f"unknown backend {name!r}; known backends: {', '.join(known_backends())}")
    return _REGISTRY[name]


def get_backend(name: str, base_url: str, *, model: str | None = None, options: BackendOptions | None = None,
                **extras: Any) -> Backend:  # fmt: skip
    """The one way a backend is built: the one registered as `name`, at `base_url`, with what every backend takes
    (`options`) and its own extras (llama-server's `slot_pinning`, Ollama's `layout` and `keep_alive`)."""
    return backend_class(name)(base_url, model, options=options, **extras)


__all__ = [
    "Backend",
    "BackendOptions",
    "ChatResult",
    "ServerLimits",
    "ServerMemory",
    "backend_class",
    "get_backend",
    "known_backends",
    "public_url",
    "register_backend",
]
