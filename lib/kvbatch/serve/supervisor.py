"""Keeps a server usable for the executor: waits for health with capped back-off, restarts the embedded one
(smaller when memory was the cause), checks that an external server gives the context the plan needs, and says
what it did so the run report can show it. Each supervisor holds the `SlotLayout` its server runs with now: a
back-off replaces it (never changes it in place: the plan keeps the one it planned) and returns the new one in its
`Recovery`, the event the endpoint applies to its capacity and the report shows."""

from __future__ import annotations

import abc
import asyncio
import random
import secrets
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kvbatch import defaults
from kvbatch.errors import KvbatchError, OutOfMemoryError, ServerGoneError, ServerLimitError, ServerStartError
from kvbatch.serve.backends import Backend, BackendOptions, get_backend
from kvbatch.serve.build_record import build_summary
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.log import describe_exit
from kvbatch.serve.oomkill import OomWatch
from kvbatch.serve.probes import MemoryProbe, OllamaPsProbe, probe_for_server
from kvbatch.serve.server import EmbeddedServer


@dataclass
class Recovery:
    """One recovery action, for the event log."""

    cause: str
    action: str
    waited_s: float
    out_of_memory: bool
    found_down: bool = True
    """The server was not up and healthy when the recovery looked: a crash, not a hiccup of one connection."""
    oom_evidence: str | None = None
    """What showed it was out of memory (the error, the server's log, the kernel log, the cgroup's kill count)."""
    server_exit: str | None = None
    """How the server's process ended ("killed by SIGKILL"), when it had."""
    server_peak_bytes: int | None = None
    """The most memory the server held before it died, from its own cgroup (where it has one)."""
    layout: SlotLayout | None = None
    """The layout the server came back with, when the recovery changed it (fewer slots, a smaller context)."""

    def event_fields(self, running: SlotLayout) -> dict[str, object]:
        """Its fields for events.jsonl, with the layout the server came back with as `slots` and `slot_context`: its
        own new one, or `running` (what the server runs with) when it changed none."""
        layout = self.layout or running
        fields = {key: value for key, value in asdict(self).items() if key != "layout"}
        return {**fields, "slots": layout.slots, "slot_context": layout.slot_context_tokens}


def backoff_delays(start_s: float = defaults.BACKOFF_START_S, cap_s: float = defaults.BACKOFF_CAP_S):
    """Capped exponential back-off with full jitter: start, 2x, 4x ... up to the cap, each drawn in [d/2, d]."""
    delay = start_s
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * 2, cap_s)


def halved_context(layout: SlotLayout, minimum: int) -> int:
    """Half the per-slot context on the 256 grid, never below `minimum` (what the largest request needs)."""
    align = defaults.CONTEXT_ALIGN_TOKENS
    return max(layout.slot_context_tokens // 2 // align * align, minimum)


class Supervisor(abc.ABC):
    backend: Backend
    layout: SlotLayout
    label: str = "server"
    restarts_itself: bool = False
    """True when the server is ours to restart (embedded, a Ray actor): recovery brings it back rather than
    waiting for someone else to."""
    holds_layout_context: bool = True
    """The layout's per-slot context is what the server gives each request (we started it, or send `num_ctx`); a
    running OpenAI-compatible server's is its own, which the layout only estimates."""

    @property
    def pid(self) -> int | None:
        return None

    def log_text(self) -> str:
        return ""

    def memory_probe(self) -> MemoryProbe | None:
        """The probe that follows this server's memory, or None when its memory is not ours to read."""
        return None

    def flags(self) -> dict[str, object]:
        """The server settings recorded beside the run."""
        return {}

    @abc.abstractmethod
    async def start(self) -> list[Recovery]:
        """Make the server ready; returns the back-offs it needed."""

    @abc.abstractmethod
    async def recover(self, cause: KvbatchError) -> Recovery:
        """Bring the server back after `cause`; raise ServerGoneError when it cannot."""

    async def restart(self, cause: KvbatchError) -> Recovery | None:
        """Restart a server that is up and says it is healthy but fails every request (wedged); None where the
        server is not ours to restart (someone else's: it can only be probed until it serves again)."""
        return None

    async def check_after_first_reply(self) -> None:  # noqa: B027 (optional hook)
        """Verify, once a request has been served, that the server gives what the plan needs."""

    async def close(self) -> None:
        await self.backend.aclose()

    def _run_with(self, layout: SlotLayout) -> SlotLayout:
        """Replace the layout this server runs with (a new value: whoever kept the old one keeps what it was)."""
        self.layout = layout
        return layout

    def _changed_since(self, before: SlotLayout) -> SlotLayout | None:
        """The layout now, when it is not `before` (for a `Recovery`: a new layout is the event)."""
        return self.layout if self.layout != before else None


class EmbeddedSupervisor(Supervisor):
    """Owns an embedded llama-server. On out-of-memory it halves the slots, then the per-slot context, never
    below `min_slot_context` (the largest request must still fit)."""

    label = "embedded"
    restarts_itself = True

    def __init__(
        self,
        config: ServerConfig,
        layout: SlotLayout,
        *,
        min_slot_context: int,
        log_path: Path,
        request_timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        oom_counter_files: list[Path] | None = None,
    ) -> None:
        self.oom_counter_files = oom_counter_files
        """Where out-of-memory kills are counted (default: this process's own cgroup, found at each start)."""
        self._oom_watch: OomWatch | None = None
        self.base_config = replace(config, kv_unified=False)
        self.layout = layout
        self.min_slot_context = min_slot_context
        self.log_path = log_path
        self.server: EmbeddedServer | None = None
        self.api_key = secrets.token_urlsafe(24)
        """One key for the life of the supervisor: a restarted server answers the same client."""
        self.backend = get_backend("openai", "http://127.0.0.1:0", slot_pinning=True,
                                   options=BackendOptions(api_key=self.api_key, request_timeout_s=request_timeout_s))

    @property
    def config(self) -> ServerConfig:
        """The server settings for the current layout: context = slots x per-slot context."""
        return replace(
            self.base_config,
            context_tokens=self.layout.total_context_tokens,
            parallel_slots=self.layout.slots,
        )

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server else None

    def log_text(self) -> str:
        return self.server.log_text() if self.server else ""

    def memory_probe(self) -> MemoryProbe | None:
        return probe_for_server(self.server.pid, self.server.log_text) if self.server and self.server.pid else None

    def flags(self) -> dict[str, object]:
        return {**self.config.flags(), **build_summary()}

    def _shrink(self) -> str:
        layout = self.layout
        if layout.slots > 1:
            return f"restarted with {self._run_with(layout.with_slots(layout.slots // 2)).describe()}"
        smaller = halved_context(layout, self.min_slot_context)
        if smaller >= layout.slot_context_tokens:
            raise OutOfMemoryError(
                f"the server runs out of memory even at {layout.slot_context_tokens} tokens and 1 slot, and the "
                f"largest request needs {self.min_slot_context}; free memory, raise the memory cap, or use a "
                "quantized KV cache (--kv-type q8_0)"
            )
        return f"restarted with {self._run_with(layout.with_slot_context(smaller)).describe()}"

    def _start_blocking(self) -> list[Recovery]:
        backoffs: list[Recovery] = []
        while True:
            started = time.perf_counter()
            self.server = EmbeddedServer(self.config, log_path=self.log_path, api_key=self.api_key)
            self._oom_watch = OomWatch.now(self.oom_counter_files)
            try:
                self.server.start()
            except ServerStartError as exc:
                if not exc.out_of_memory:
                    raise
                action = self._shrink()
                backoffs.append(Recovery(str(exc.failure_line), action, time.perf_counter() - started, True,
                                         layout=self.layout))  # fmt: skip
                continue
            self.backend.retarget(self.server.url)
            return backoffs

    async def start(self) -> list[Recovery]:
        return await asyncio.to_thread(self._start_blocking)

    def _killed_for_memory(self) -> str | None:
        """The kernel's OOM killer ended the server (its own log says nothing: it got no chance to): the evidence."""
        if self.server is None or self._oom_watch is None:
            return None
        return self._oom_watch.evidence(self.server.pid, self.server.returncode, self.server.cgroup)

    async def recover(self, cause: KvbatchError) -> Recovery:
        started = time.perf_counter()
        before = self.layout
        if self.server and self.server.is_running() and await self.backend.health():
            return Recovery(str(cause)[:300], "server healthy; retried", time.perf_counter() - started, False, False)
        if self.server:
            await asyncio.to_thread(self.server.wait_exit, 1.0)
        logged_oom = bool(self.server) and (await asyncio.to_thread(self.server.log)).out_of_memory
        killed = await asyncio.to_thread(self._killed_for_memory)
        out_of_memory = isinstance(cause, OutOfMemoryError) or logged_oom or bool(killed)
        evidence = ("the request's error" if isinstance(cause, OutOfMemoryError) else "the server's log"
                    if logged_oom else killed) if out_of_memory else None  # fmt: skip
        returncode = self.server.returncode if self.server else None
        server_exit = describe_exit(returncode) if returncode is not None else None
        peak = self.server.cgroup.peak_bytes() if self.server and self.server.cgroup else None  # before its removal
        if self.server:
            await asyncio.to_thread(self.server.stop)  # the log and the stop off the event loop
        action = self._shrink() if out_of_memory else "restarted the embedded server"
        backoffs = await self.start()
        if backoffs:
            action = backoffs[-1].action
        return Recovery(str(cause)[:300], action, time.perf_counter() - started, out_of_memory,
                        oom_evidence=evidence, server_exit=server_exit, server_peak_bytes=peak,
                        layout=self._changed_since(before))  # fmt: skip

    async def restart(self, cause: KvbatchError) -> Recovery:
        started = time.perf_counter()
        if self.server:
            await asyncio.to_thread(self.server.stop)
        backoffs = await self.start()
        action = backoffs[-1].action if backoffs else "restarted the embedded server (it failed every request)"
        return Recovery(str(cause)[:300], action, time.perf_counter() - started, bool(backoffs), found_down=False,
                        layout=backoffs[-1].layout if backoffs else None)  # fmt: skip

    async def close(self) -> None:
        await super().close()
        if self.server:
            await asyncio.to_thread(self.server.stop)


class ExternalSupervisor(Supervisor):
    """A server someone else runs: we can only wait for it, with capped back-off and jitter, up to `max_wait_s`."""

    label = "external"
    holds_layout_context = False

    def __init__(self, backend: Backend, layout: SlotLayout, *, max_wait_s: float = defaults.MAX_WAIT_S) -> None:
        self.backend = backend
        self.layout = layout
        self.max_wait_s = max_wait_s

    def flags(self) -> dict[str, object]:
        from kvbatch.serve.backends import public_url

        return {"url": public_url(self.backend.base_url), "backend": self.backend.name, "model": self.backend.model}

    async def _wait_healthy(self) -> tuple[float, bool]:
        """Seconds waited for health, and whether the server was down when first asked."""
        started = time.perf_counter()
        was_down = False
        for delay in backoff_delays():
            if await self.backend.health():
                break
            was_down = True
            if time.perf_counter() - started > self.max_wait_s:
                raise ServerGoneError(
                    f"{self.backend.base_url} did not become healthy within {self.max_wait_s:.0f} s (--max-wait); "
                    "every finished request is saved: run the same command again once the server is back"
                )
            await asyncio.sleep(delay)
        return time.perf_counter() - started, was_down

    async def start(self) -> list[Recovery]:
        await self._wait_healthy()
        return []

    async def recover(self, cause: KvbatchError) -> Recovery:
        waited, was_down = await self._wait_healthy()
        return Recovery(str(cause)[:300], "waited for health", waited, isinstance(cause, OutOfMemoryError), was_down)


class OllamaSupervisor(ExternalSupervisor):
    """A running Ollama: `num_ctx` is ours to set, so an out-of-memory halves the per-slot context (Ollama reloads
    the model at the new size); after the first reply `/api/ps` must show the context asked for, all on the GPU."""

    holds_layout_context = True  # num_ctx goes with every request

    label = "ollama"

    def __init__(
        self,
        backend: Backend,
        layout: SlotLayout,
        *,
        min_slot_context: int,
        max_wait_s: float = defaults.MAX_WAIT_S,
        gpu_budget: bool = False,
        allow_cpu_spill: bool = False,
    ) -> None:
        super().__init__(backend, layout, max_wait_s=max_wait_s)
        self._run_with(layout)
        self.min_slot_context = min_slot_context
        self.gpu_budget = gpu_budget
        self.allow_cpu_spill = allow_cpu_spill

    def _run_with(self, layout: SlotLayout) -> SlotLayout:
        """The backend sends the per-slot context as every request's `num_ctx`: it gets the new layout too."""
        self.backend.layout = layout  # type: ignore[attr-defined]
        return super()._run_with(layout)

    def memory_probe(self) -> MemoryProbe | None:
        return OllamaPsProbe(self.backend, field="size_vram" if self.gpu_budget else "size")  # type: ignore[arg-type]

    async def check_after_first_reply(self) -> None:
        loaded = await self.backend.loaded()  # type: ignore[attr-defined]
        asked = self.layout.slot_context_tokens
        if loaded is None:
            return
        if loaded.context_length and loaded.context_length < asked:
            raise ServerLimitError(
                f"Ollama loaded {self.backend.model} with a context of {loaded.context_length} tokens, not the "
                f"{asked} asked for (num_ctx): the server caps it (OLLAMA_CONTEXT_LENGTH, or the model's trained "
                f"length). Plan for it with --slot-ctx {loaded.context_length}, or lift the cap on the server."
            )
        if loaded.offloaded_to_cpu and not self.allow_cpu_spill:  # local or remote: some layers on a GPU, some not
            share = loaded.vram_bytes / loaded.size_bytes
            raise ServerLimitError(
                f"Ollama put only {share:.0%} of {self.backend.model} on the GPU at num_ctx {asked} (size_vram "
                f"{loaded.vram_bytes} < size {loaded.size_bytes}): the context does not fit the card and runs partly "
                "on the CPU, several times slower. Lower --slot-ctx, use a q8_0 KV cache, or pass --allow-cpu-spill."
            )

    async def recover(self, cause: KvbatchError) -> Recovery:
        waited, was_down = await self._wait_healthy()
        if not isinstance(cause, OutOfMemoryError):
            return Recovery(str(cause)[:300], "waited for health", waited, False, was_down)
        layout = self.layout
        smaller = halved_context(layout, self.min_slot_context)
        if smaller >= layout.slot_context_tokens:
            # Already the least the requests need: Ollama reloads at the same size. A request that keeps taking
            # the runner down is found by the executor's suspect runs and fails alone.
            return Recovery(str(cause)[:300], f"num_ctx kept at {layout.slot_context_tokens}, the least the "
                            "requests need", waited, True, was_down)  # fmt: skip
        return Recovery(str(cause)[:300], f"num_ctx lowered to {smaller}", waited, True, was_down,
                        layout=self._run_with(layout.with_slot_context(smaller)))  # fmt: skip
