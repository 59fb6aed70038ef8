"""Background memory sampling during a run: a time series on disk, and a reaction above a threshold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kvbatch.probes import MemoryProbe, pick_probe


class MemoryMonitor:
    """Samples the best probe for the supervised server every `interval_s` into a CSV (t, bytes, probe).

    The probe is re-picked when the server's PID changes (a restart), so the series follows the server.
    """

    def __init__(
        self,
        supervisor,
        csv_path: Path,
        *,
        interval_s: float = 1.0,
        threshold_bytes: int | None = None,
        on_high: Callable[[int], Awaitable[None]] | None = None,
        prefer: str | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.csv_path = csv_path
        self.interval_s = interval_s
        self.threshold_bytes = threshold_bytes
        self.on_high = on_high
        self.prefer = prefer
        self.peak_bytes = 0
        self.above = False
        """True while the last sample was above the threshold."""
        self.probe_name: str | None = None
        self._probe: MemoryProbe | None = None
        self._probe_pid: int | None = None

    def _current_probe(self) -> MemoryProbe | None:
        pid = self.supervisor.pid
        if self._probe is None or pid != self._probe_pid:
            ollama_url = self.supervisor.backend.base_url if self.supervisor.backend.name == "ollama" else None
            try:
                self._probe = pick_probe(
                    self.prefer,
                    pid=pid,
                    ollama_url=ollama_url,
                    ollama_model=self.supervisor.backend.model,
                    log_text=self.supervisor.log_text if pid else None,
                )
            except Exception:  # no probe for this server (an external OpenAI server on another machine)
                self._probe = None
            self._probe_pid = pid
            self.probe_name = self._probe.name if self._probe else None
        return self._probe

    def sample(self) -> int | None:
        probe = self._current_probe()
        if probe is None:
            return None
        try:
            used = probe.read()
        except Exception:  # a probe read while the server restarts; the next sample will do
            return None
        self.peak_bytes = max(self.peak_bytes, used)
        new_file = not self.csv_path.exists()
        with open(self.csv_path, "a", encoding="utf-8") as handle:
            if new_file:
                handle.write("t_unix_s,used_bytes,probe\n")
            handle.write(f"{time.time():.3f},{used},{probe.name}\n")
        return used

    async def run(self) -> None:
        while True:
            used = await asyncio.to_thread(self.sample)
            if used is not None and self.threshold_bytes:
                crossed = used > self.threshold_bytes and not self.above
                self.above = used > self.threshold_bytes
                if crossed and self.on_high:
                    await self.on_high(used)  # once per crossing: lower the in-flight count, log it
            await asyncio.sleep(self.interval_s)
