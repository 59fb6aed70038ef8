"""Backends behind one interface, found by name. Importing this package imports no HTTP client."""

from __future__ import annotations

import importlib
from typing import Any

from kvbatch.backends.base import Backend, ChatResult, ServerMemory
from kvbatch.errors import UserInputError

_REGISTRY: dict[str, type[Backend]] = {}
_BUILTIN_MODULES = {
    "openai": "kvbatch.backends.openai_compat",
    "ollama": "kvbatch.backends.ollama_native",
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


def get_backend(name: str, base_url: str, **kwargs: Any) -> Backend:
    """Build the backend registered as `name`; an unknown name lists the known ones."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise UserInputError(f"unknown backend {name!r}; known backends: {', '.join(known_backends())}")
    return _REGISTRY[name](base_url, **kwargs)


__all__ = ["Backend", "ChatResult", "ServerMemory", "get_backend", "known_backends", "register_backend"]
