"""Background memory sampling during a run: a time series on disk, and reactions above thresholds (lower the
in-flight count near the budget; drain and restart our own server past the plan's bound).

The supervisor says which probe follows its server (NVML per process on a GPU, RSS on a CPU, Ollama's /api/ps);
the probe is asked again after a restart (a new PID), so the series follows the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from kvbatch import defaults
from kvbatch.batch.records import append_memory_sample
from kvbatch.errors import KvbatchError
from kvbatch.serve.probes import MemoryProbe
from kvbatch.serve.supervisor import Supervisor


@dataclass
class MemoryLine:
    """A level of memory and what to do when the server passes it: once per crossing (memory must fall below the
    line first), or at the next sample again when the reaction returns False (not yet)."""

    bytes: int
    react: Callable[[int], Awaitable[bool | None]]
    above: bool = False


class MemoryMonitor:
    """Samples the supervised server's memory every `interval_s` into a CSV (t, bytes, probe, endpoint)."""

    def __init__(
        self,
        supervisor: Supervisor,
        csv_path: Path,
        *,
        label: str = "server",
        interval_s: float = defaults.MEMORY_SAMPLE_S,
    ) -> None:
        self.supervisor = supervisor
        self.csv_path = csv_path
        self.label = label
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.last_bytes: int | None = None
        """The latest sample: after a crash, the memory the server held just before it died (to the interval)."""
        self.lines: list[MemoryLine] = []
        """The levels it reacts to (`add_line`): the budget's threshold, the drain-and-restart bound."""
        self.probe_name: str | None = None
        self._probe: MemoryProbe | None = None
        self._probe_pid: int | None = None
        self._probed = False

    def _current_probe(self) -> MemoryProbe | None:
        pid = self.supervisor.pid
        if not self._probed or pid != self._probe_pid:
            try:
                self._probe = self.supervisor.memory_probe()
            except KvbatchError:
                self._probe = None
            self._probe_pid = pid
            self._probed = True
            self.probe_name = self._probe.name if self._probe else None
        return self._probe

    async def sample(self) -> int | None:
        probe = self._current_probe()
        if probe is None:
            return None
        try:
            used = await probe.aread()
        except Exception:  # a probe read while the server restarts; the next sample will do
            return None
        self.peak_bytes = max(self.peak_bytes, used)
        self.last_bytes = used
        append_memory_sample(self.csv_path, used, probe.name, self.label)
        return used

    def add_line(self, line: MemoryLine) -> None:
        self.lines.append(line)

    @property
    def above(self) -> bool:
        """True while the last sample was above any of the lines."""
        return any(line.above for line in self.lines)

    async def run(self) -> None:
        while True:
            used = await self.sample()
            for line in self.lines if used is not None else ():
                crossed = used > line.bytes and not line.above
                line.above = used > line.bytes
                if crossed and await line.react(used) is False:
                    line.above = False  # not handled yet: asked again at the next sample
            await asyncio.sleep(self.interval_s)
