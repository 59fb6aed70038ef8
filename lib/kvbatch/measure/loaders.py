"""Loading a model at one context size and reading what it then holds: the embedded llama-server (one process per
load, optionally under an address-space cap) or a running Ollama (a request with a new `num_ctx` reloads it).
Every HTTP call goes through a backend; the sync surface here runs them on one background event loop."""

from __future__ import annotations

import abc
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from kvbatch import defaults
from kvbatch.aio import LoopThread
from kvbatch.errors import FillError, KvbatchError, OutOfMemoryError
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.build_record import build_summary
from kvbatch.serve.config import ServerConfig, build_has_gpu
from kvbatch.serve.probes import MemoryProbe, OllamaPsProbe, probe_for_server
from kvbatch.serve.server import EmbeddedServer


class TooBigError(OutOfMemoryError):
    """A load that did not fit: the server failed to allocate, died while serving, held more than the budget, or
    (Ollama on a GPU) moved part of the model to the CPU."""


@dataclass
class LoadPoint:
    """One load of the model at one context: the memory every probe saw, and how it went."""

    context_tokens: int
    repeat: int
    used_bytes: int
    probe: str
    kv_log_bytes: int | None = None
    virtual_bytes: int | None = None
    load_s: float | None = None
    tokens_in_use: int = 0
    offloaded_share: float | None = None
    """Ollama: the share of the model on the GPU (size_vram / size); below 1 means layers went to the CPU."""
    fits: bool = True
    """False: the load did not fit (out of memory, refused, spilled to the CPU) or its fill could not be made;
    `reason` says which, and the point holds no memory figure (the fit leaves it out)."""
    reason: str = ""

    @property
    def capped_bytes(self) -> int:
        """The figure an address-space cap limits (on a CPU), else the memory used."""
        return self.virtual_bytes if self.virtual_bytes is not None else self.used_bytes


class LoadedModel(abc.ABC):
    probe: MemoryProbe
    load_s: float
    context_tokens: int

    @abc.abstractmethod
    def memory(self) -> LoadPoint:
        """Read the memory now."""

    @abc.abstractmethod
    def fill(self, tokens: int, max_tokens: int = 4) -> int:
        """Serve one request whose prompt is `tokens` long; return the prompt tokens the server reports. A
        prompt the server cut (more than 10 % short) is an error: the fill would not have filled anything."""


class Loader(abc.ABC):
    """Loads a model at a context size. `load()` is a context manager; a failed load raises KvbatchError."""

    name: str = ""
    on_gpu: bool = False
    """True when the budget is a GPU's memory (enforced by the card and by reading it), not an address-space cap."""

    @abc.abstractmethod
    def load(self, context_tokens: int, memory_cap_bytes: int | None = None) -> contextlib.AbstractContextManager: ...

    def flags(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the loader's event loop and connections."""


def _check_fill(asked: int, reported: int, where: str) -> int:
    if reported and reported < asked * (1 - defaults.TRUNCATION_TOLERANCE):
        raise FillError(f"{where} counted {reported} prompt tokens of {asked} asked for: the fill fell short")
    return reported


class _EmbeddedLoaded(LoadedModel):
    def __init__(self, server: EmbeddedServer, probe_name: str | None, loop: LoopThread) -> None:
        self.server = server
        assert server.pid is not None
        self.probe = probe_for_server(server.pid, server.log_text, probe_name)
        self.load_s = server.start_time_s or 0.0
        self.context_tokens = server.config.context_tokens
        self._loop = loop
        self._backend = get_backend("openai", server.url, options=BackendOptions(api_key=server.api_key))

    def memory(self) -> LoadPoint:
        try:
            virtual = psutil.Process(self.server.pid).memory_info().vms
        except psutil.NoSuchProcess:
            virtual = None
        return LoadPoint(
            self.context_tokens,
            0,
            self.probe.read(),
            self.probe.name,
            kv_log_bytes=self.server.log().kv_total_bytes,
            virtual_bytes=None if self.server.log().on_gpu else virtual,
            load_s=self.load_s,
        )

    def fill(self, tokens: int, max_tokens: int = 4) -> int:
        try:
            reported = self._loop.call(self._backend.fill(tokens, context_tokens=self.context_tokens,
                                                          max_tokens=max_tokens))  # fmt: skip
        except KvbatchError as exc:
            if self.server.wait_exit(0.5) is not None:
                line = self.server.log().failure_line or str(exc)
                raise TooBigError(
                    f"the server died serving {tokens} tokens at context {self.context_tokens}: {line}"
                ) from exc
            raise
        return _check_fill(tokens, reported, "llama-server")

    def close(self) -> None:
        self._loop.call(self._backend.aclose())


class EmbeddedLoader(Loader):
    """Starts llama-server once per load, with the given KV settings; the cap (RLIMIT_AS) makes OOM real."""

    name = "embedded"

    def __init__(self, config: ServerConfig | None = None, *, probe: str | None = None, log_dir: Path | None = None):
        # The same thread stacks with and without a cap, so a line fitted without one predicts where a cap bites.
        config = config or ServerConfig()
        self.config = replace(config, thread_stack_bytes=config.thread_stack_bytes or defaults.CAPPED_STACK_BYTES)
        self.probe = probe
        self._own_logs = log_dir is None
        """No folder given: the loads' logs (a search's failed loads keep theirs) go in one removed on close()."""
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvbatch-measure-"))
        self._loop = LoopThread()
        self.on_gpu = build_has_gpu() and self.config.gpu_layers != 0

    def flags(self) -> dict[str, Any]:
        return {**self.config.flags(), **build_summary()}

    @contextlib.contextmanager
    def load(self, context_tokens: int, memory_cap_bytes: int | None = None) -> Iterator[LoadedModel]:
        config = replace(
            self.config,
            context_tokens=context_tokens,
            memory_cap_bytes=memory_cap_bytes or self.config.memory_cap_bytes,
        )
        log_path = self.log_dir / f"server-ctx{context_tokens}.log" if self.log_dir else None
        if log_path and log_path.exists():
            log_path.unlink()
        with EmbeddedServer(config, log_path=log_path) as server:
            loaded = _EmbeddedLoaded(server, self.probe, self._loop)
            try:
                yield loaded
            finally:
                loaded.close()

    def close(self) -> None:
        self._loop.close()
        if self._own_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)


class _OllamaLoaded(LoadedModel):
    def __init__(self, loader: OllamaLoader, context_tokens: int, load_s: float) -> None:
        self.loader = loader
        self.context_tokens = context_tokens
        self.probe = OllamaPsProbe(loader.backend, field="size_vram" if loader.on_gpu else "size")
        self.load_s = load_s

    def memory(self) -> LoadPoint:
        entry = self.loader.loop.call(self.loader.backend.loaded())
        if entry is None:
            raise KvbatchError(f"Ollama does not list {self.loader.backend.model} as loaded after a request")
        used = entry.vram_bytes if self.loader.on_gpu else entry.size_bytes
        share = entry.vram_bytes / entry.size_bytes if entry.size_bytes else None
        return LoadPoint(self.context_tokens, 0, used, self.probe.name, load_s=self.load_s, offloaded_share=share)

    def fill(self, tokens: int, max_tokens: int = 4) -> int:
        reported = self.loader.loop.call(
            self.loader.backend.fill(tokens, context_tokens=self.context_tokens, max_tokens=max_tokens)
        )
        return _check_fill(tokens, reported, "Ollama")


class OllamaLoader(Loader):
    """A running Ollama: a request with a new `num_ctx` reloads the model; /api/ps reports its size. On a GPU
    budget, a load that Ollama split between card and CPU (`size_vram < size`) did not fit."""

    name = "ollama"

    def __init__(self, url: str, model: str, *, parallel: int = 1, on_gpu: bool = False,
                 fill_tokens_per_word: float | None = None) -> None:  # fmt: skip
        self.loop = LoopThread()
        self.backend = get_backend("ollama", url, model=model)
        if fill_tokens_per_word:  # learned by an earlier notebook of the same measurement: its first fill fits
            self.backend.fill_tokens_per_word = fill_tokens_per_word
        self.parallel = parallel
        self.on_gpu = on_gpu

    def flags(self) -> dict[str, Any]:
        from kvbatch.serve.backends import public_url

        return {"url": public_url(self.backend.base_url), "model": self.backend.model, "parallel": self.parallel,
                "fill_tokens_per_word": round(self.backend.fill_tokens_per_word, 4)}  # fmt: skip

    @contextlib.contextmanager
    def load(self, context_tokens: int, memory_cap_bytes: int | None = None) -> Iterator[LoadedModel]:
        started = time.perf_counter()
        self.loop.call(self.backend.fill(1, context_tokens=context_tokens, max_tokens=1))
        loaded = _OllamaLoaded(self, context_tokens, time.perf_counter() - started)
        point = loaded.memory()
        # Some layers on a GPU and some not (0 < size_vram < size): the context did not fit the card, local or remote;
        # on a GPU budget none on the card (size_vram 0) did not fit either.
        share = point.offloaded_share
        if share is not None and (0 < share < 1.0 or (self.on_gpu and share == 0)):
            raise TooBigError(
                f"Ollama put {point.offloaded_share:.0%} of the model on the GPU at num_ctx {context_tokens} "
                "(size_vram < size): the rest runs on the CPU"
            )
        yield loaded

    def close(self) -> None:
        self.loop.call(self.backend.aclose())
        self.loop.close()
