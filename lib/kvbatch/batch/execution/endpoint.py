"""One server in the pool: its supervisor (and so its backend and slot layout), a gate on the requests in flight,
one recovery at a time, and its health. In a pool of several, an endpoint that cannot be brought back is taken
out, probed with back-off, and re-admitted; its requests go back to the feed for the others."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from kvbatch import defaults
from kvbatch.batch.execution.gate import Gate
from kvbatch.batch.execution.recorder import Recorder
from kvbatch.batch.monitor import MemoryMonitor
from kvbatch.errors import KvbatchError, ServerGoneError
from kvbatch.serve.supervisor import Supervisor, backoff_delays

POOL_GRACE_S = 5.0
"""In a pool, a server someone else runs that is not healthy within this long is taken out (the others carry on)
and probed with back-off until it is back. Servers we start (embedded, Ray actors) are restarted instead."""


class EndpointOut(Exception):
    """The endpoint was taken out of the pool: hand the request back for another endpoint."""


class Endpoint:
    def __init__(
        self, supervisor: Supervisor, *, label: str, recorder: Recorder, pooled: bool,
        max_wait_s: float = defaults.MAX_WAIT_S,
    ) -> None:  # fmt: skip
        self.supervisor = supervisor
        self.label = label
        self.recorder = recorder
        self.pooled = pooled
        self.max_wait_s = max_wait_s
        self.in_flight_cap = supervisor.layout.slots
        """Lowered (never raised) after an out-of-memory, so no later phase undoes the halving."""
        self.gate = Gate(self.in_flight_cap)
        self.generation = 0
        self.ready = asyncio.Event()
        self.ready.set()
        self.out = False
        self.gave_up = False
        self.back = asyncio.Event()
        self.back.set()
        self.fatal: KvbatchError | None = None
        self.first_reply_checked = False
        self.monitor: MemoryMonitor | None = None
        self._lock = asyncio.Lock()
        self._out_since = 0.0
        self._readmit: asyncio.Task | None = None

    @property
    def backend(self):
        return self.supervisor.backend

    @property
    def slots(self) -> int:
        return self.supervisor.layout.slots

    async def set_in_flight(self, wanted: int) -> int:
        limit = max(1, min(wanted, self.in_flight_cap, self.slots))
        await self.gate.set_limit(limit)
        return limit

    async def recover(self, cause: KvbatchError, generation_seen: int) -> None:
        """Bring the server back after `cause` (once per failure, whichever worker saw it first)."""
        async with self._lock:
            if self.generation != generation_seen or self.out:
                return
            self.ready.clear()
            try:
                recovery = await self._recover_once(cause)
            except KvbatchError as exc:
                self.generation += 1
                if not self.pooled:
                    self.fatal = exc
                    self.ready.set()
                    raise
                self._take_out(exc)
                return
            self.generation += 1
            if recovery.out_of_memory:
                self.in_flight_cap = max(1, min(self.in_flight_cap, self.gate.limit) // 2)
            await self.set_in_flight(self.gate.limit)
            self.recorder.stats.endpoint(self.label).recoveries += 1
            self.recorder.event(
                "recovery",
                endpoint=self.label,
                **asdict(recovery),
                in_flight_limit=self.gate.limit,
                slots=self.slots,
                slot_context=self.supervisor.layout.slot_context_tokens,
            )
            self.ready.set()

    async def _recover_once(self, cause: KvbatchError):
        if not self.pooled or self.supervisor.restarts_itself:
            return await self.supervisor.recover(cause)
        try:
            return await asyncio.wait_for(self.supervisor.recover(cause), POOL_GRACE_S)
        except asyncio.TimeoutError as exc:
            raise ServerGoneError(f"{self.label} was not back within {POOL_GRACE_S:.0f} s") from exc

    def _take_out(self, cause: KvbatchError) -> None:
        self.out = True
        self.back.clear()
        self._out_since = time.monotonic()
        self.recorder.event("endpoint_out", endpoint=self.label, cause=str(cause)[:300])
        self.ready.set()  # workers wake, see `out`, and hand their requests back
        self._readmit = asyncio.create_task(self._probe_until_back())

    async def wait_back(self, all_done: asyncio.Event) -> bool:
        """After a hand-back: wait until the endpoint is back in the pool (True), or the batch is done without it,
        or it was given up (False: the worker stops)."""
        waits = {asyncio.ensure_future(self.back.wait()), asyncio.ensure_future(all_done.wait())}
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return self.back.is_set() and not self.out

    async def _probe_until_back(self) -> None:
        for delay in backoff_delays(1.0, defaults.BACKOFF_CAP_S):
            if time.monotonic() - self._out_since > self.max_wait_s:
                self.gave_up = True
                self.recorder.event("endpoint_given_up", endpoint=self.label, out_s=round(self.max_wait_s, 1))
                self.back.set()  # its workers wake, see it is still out, and stop
                return
            await asyncio.sleep(delay)
            try:
                healthy = await self.backend.health()
                if healthy:
                    await asyncio.wait_for(self.supervisor.recover(ServerGoneError("re-admission")), POOL_GRACE_S)
            except (KvbatchError, asyncio.TimeoutError):
                healthy = False
            if healthy:
                break
        self.recorder.stats.endpoint(self.label).out_s += time.monotonic() - self._out_since
        self.recorder.event("endpoint_back", endpoint=self.label, out_s=round(time.monotonic() - self._out_since, 1))
        self.out = False
        self.back.set()

    async def close(self) -> None:
        if self._readmit is not None:
            self._readmit.cancel()
        await self.supervisor.close()
