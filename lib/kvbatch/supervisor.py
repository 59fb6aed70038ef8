"""Keeps a server usable for the executor: waits for health with backoff, restarts the embedded one (smaller
when memory was the cause), and says what it did so the run report can show it."""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kvbatch.backends import Backend, get_backend
from kvbatch.errors import KvbatchError, OutOfMemoryError, ServerGoneError, ServerStartError
from kvbatch.plan import CONTEXT_ALIGN_TOKENS
from kvbatch.server import EmbeddedServer, ServerConfig


@dataclass
class Recovery:
    """One recovery action, for the event log."""

    cause: str
    action: str
    waited_s: float
    out_of_memory: bool


class Supervisor(abc.ABC):
    backend: Backend
    slot_pinning: bool = False
    """True on llama-server: each worker pins its own slot (`id_slot`) so that slot's prefix cache stays warm."""

    @property
    @abc.abstractmethod
    def slots(self) -> int:
        """Parallel slots the server has now."""

    @property
    def pid(self) -> int | None:
        return None

    def log_text(self) -> str:
        return ""

    @abc.abstractmethod
    async def start(self) -> list[Recovery]:
        """Make the server ready; returns the back-offs it needed."""

    @abc.abstractmethod
    async def recover(self, cause: KvbatchError) -> Recovery:
        """Bring the server back after `cause`; raise ServerGoneError when it cannot."""

    async def close(self) -> None:
        await self.backend.aclose()


class EmbeddedSupervisor(Supervisor):
    """Owns an embedded llama-server. On out-of-memory it halves the slots, then the per-slot context, never
    below `min_slot_context` (the largest request must still fit)."""

    slot_pinning = True

    def __init__(
        self,
        config: ServerConfig,
        *,
        slot_context: int,
        min_slot_context: int,
        log_path: Path,
        request_timeout_s: float = 600.0,
    ) -> None:
        self.slot_context = slot_context
        self.min_slot_context = min_slot_context
        self.config = replace(config, context_tokens=slot_context * config.parallel_slots, kv_unified=False)
        self.log_path = log_path
        self.server: EmbeddedServer | None = None
        self.request_timeout_s = request_timeout_s
        self.backend = get_backend("openai", "http://127.0.0.1:0", request_timeout_s=request_timeout_s)

    @property
    def slots(self) -> int:
        return self.config.parallel_slots

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server else None

    def log_text(self) -> str:
        return self.server.log_text() if self.server else ""

    def _shrink(self) -> str:
        if self.config.parallel_slots > 1:
            slots = self.config.parallel_slots // 2
            self.config = replace(self.config, parallel_slots=slots, context_tokens=slots * self.slot_context)
            return f"restarted with {slots} slot(s) of {self.slot_context} tokens"
        smaller = max(self.slot_context // 2 // CONTEXT_ALIGN_TOKENS * CONTEXT_ALIGN_TOKENS, self.min_slot_context)
        if smaller >= self.slot_context:
            raise OutOfMemoryError(
                f"the server runs out of memory even at {self.slot_context} tokens and 1 slot, and the largest request "
                f"needs {self.min_slot_context}; free memory, raise the memory cap, or use a quantized KV cache"
            )
        self.slot_context = smaller
        self.config = replace(self.config, context_tokens=smaller)
        return f"restarted with 1 slot of {smaller} tokens"

    def _start_blocking(self) -> list[Recovery]:
        backoffs: list[Recovery] = []
        while True:
            started = time.perf_counter()
            self.server = EmbeddedServer(self.config, log_path=self.log_path)
            try:
                self.server.start()
            except ServerStartError as exc:
                if not exc.out_of_memory:
                    raise
                action = self._shrink()
                backoffs.append(Recovery(str(exc.failure_line), action, time.perf_counter() - started, True))
                continue
            self.backend.base_url = self.server.url
            return backoffs

    async def start(self) -> list[Recovery]:
        return await asyncio.to_thread(self._start_blocking)

    async def recover(self, cause: KvbatchError) -> Recovery:
        started = time.perf_counter()
        if self.server and self.server.is_running() and await self.backend.health():
            return Recovery(str(cause), "server healthy; retried", time.perf_counter() - started, False)
        out_of_memory = isinstance(cause, OutOfMemoryError) or bool(self.server and self.server.log().out_of_memory)
        if self.server:
            self.server.stop()
        action = self._shrink() if out_of_memory else "restarted the embedded server"
        backoffs = await self.start()
        if backoffs:
            action = backoffs[-1].action
        return Recovery(str(cause)[:300], action, time.perf_counter() - started, out_of_memory)

    async def close(self) -> None:
        await super().close()
        if self.server:
            self.server.stop()


class ExternalSupervisor(Supervisor):
    """A server someone else runs: we can only wait for it, with exponential backoff, up to `max_wait_s`."""

    def __init__(self, backend: Backend, *, slots: int = 1, max_wait_s: float = 300.0, slot_pinning: bool = False):
        self.backend = backend
        self._slots = slots
        self.max_wait_s = max_wait_s
        self.slot_pinning = slot_pinning

    @property
    def slots(self) -> int:
        return self._slots

    async def _wait_healthy(self) -> float:
        started = time.perf_counter()
        delay = 0.5
        while not await self.backend.health():
            if time.perf_counter() - started > self.max_wait_s:
                raise ServerGoneError(f"{self.backend.base_url} did not become healthy within {self.max_wait_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        return time.perf_counter() - started

    async def start(self) -> list[Recovery]:
        await self._wait_healthy()
        return []

    async def recover(self, cause: KvbatchError) -> Recovery:
        waited = await self._wait_healthy()
        return Recovery(str(cause)[:300], "waited for health", waited, isinstance(cause, OutOfMemoryError))
