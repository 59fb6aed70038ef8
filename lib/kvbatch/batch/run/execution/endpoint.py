"""One server in the pool: its supervisor (and so its backend and slot layout), its capacity (the requests in flight),
one recovery at a time, and its health. An endpoint that cannot be brought back (in a pool), or whose breaker
tripped (the failure policy found the fault to be the server's), is taken out, probed with back-off by a real chat
request (a wedged server says it is healthy), and re-admitted; its requests go back to the feed for the others.
Past `--max-wait` it is given up: the others carry on, and with none left the run stops."""

from __future__ import annotations

import asyncio
import time

from kvbatch import defaults
from kvbatch.batch.run.execution.capacity import Capacity
from kvbatch.batch.run.execution.recorder import Recorder
from kvbatch.batch.run.monitor import MemoryMonitor
from kvbatch.errors import KvbatchError, ServerGoneError
from kvbatch.serve.supervisor import Recovery, Supervisor, backoff_delays


class EndpointOut(Exception):
    """The endpoint was taken out of the pool: hand the request back for another endpoint."""


class Endpoint:
    def __init__(
        self, supervisor: Supervisor, *, label: str, recorder: Recorder, pooled: bool,
        max_wait_s: float = defaults.MAX_WAIT_S, on_probe_served=None, failing_since=None,
    ) -> None:  # fmt: skip
        self.supervisor = supervisor
        self.label = label
        self.recorder = recorder
        self.pooled = pooled
        self.max_wait_s = max_wait_s
        self.capacity = Capacity(supervisor.layout.slots)
        self.generation = 0
        self.ready = asyncio.Event()
        self.ready.set()
        self.out = False
        self.gave_up = False
        self.back = asyncio.Event()
        self.back.set()
        self.fatal: KvbatchError | None = None
        self.first_reply_checked = False
        self.warm_slots = 0
        """Slots that served a request this run (their prefix cache holds the system prompt): no warm-up again."""
        self.monitor: MemoryMonitor | None = None
        self._lock = asyncio.Lock()
        self._out_since = 0.0
        self._readmit: asyncio.Task | None = None
        self.out_cause: KvbatchError | None = None
        """Why it was last taken out, in words a person can act on (the breaker's evidence, or the recovery's)."""
        self.last_probe_error: KvbatchError | None = None
        """The last probe's failure, quoted when the server is given up."""
        self._on_probe_served = on_probe_served
        """Told when the server answers its probe and is re-admitted (the breaker counts its failures afresh)."""
        self._recoveries: dict[int, Recovery] = {}
        """What the recovery of each generation found (kept for the most recent): every worker that saw the same
        failure learns whether the server was down."""
        self._failing_since = failing_since
        """When its failures began that no real success has ended (the breaker's): `--max-wait` counts from there
        through any number of take-outs, so a server that answers probes but no real request is given up."""

    @property
    def backend(self):
        return self.supervisor.backend

    @property
    def slots(self) -> int:
        return self.supervisor.layout.slots

    async def set_in_flight(self, wanted: int) -> int:
        """`wanted` in flight, within the capacity's cap and the slots the server has now."""
        return await self.capacity.want(wanted, self.slots)

    def hold(self, generation_seen: int) -> None:
        """An attempt of this generation met a server that may be down: send nothing more until its recovery has
        looked (`recover` opens it again). Called before the failed attempt leaves the gate, so the next request
        (a suspect's solo turn above all) is not sent into the same outage and blamed for it."""
        if self.generation == generation_seen and not self.out:
            self.ready.clear()

    def release_hold(self, generation_seen: int) -> None:
        """Lift a `hold` that no recovery will (the failure was decided otherwise); one under way lifts its own."""
        if self.generation == generation_seen and not self.out and not self._lock.locked():
            self.ready.set()

    def accepts(self, generation_seen: int) -> bool:
        """Whether an attempt that waited for the gate may go: same server generation, not held, not out."""
        return self.generation == generation_seen and self.ready.is_set() and not self.out

    async def recover(self, cause: KvbatchError, generation_seen: int) -> Recovery | None:
        """Bring the server back after `cause` (once per failure, whichever worker saw it first); return what that
        recovery found, for every worker that saw the same failure (None: the endpoint was taken out)."""
        async with self._lock:
            if self.generation != generation_seen or self.out:
                return self._recoveries.get(generation_seen)
            self.ready.clear()  # held already when the failure was a lost connection (`hold`)
            last_sampled = self.monitor.last_bytes if self.monitor is not None else None  # before the restart's
            try:
                recovery = await self._recover_once(cause)
            except KvbatchError as exc:
                self.generation += 1
                if not self.pooled:
                    self.fatal = exc
                    self.ready.set()
                    raise
                self._take_out(exc)
                return None
            self._recoveries[generation_seen] = recovery
            for old in [g for g in self._recoveries if g < generation_seen - 64]:
                del self._recoveries[old]
            self.generation += 1
            if recovery.out_of_memory:
                await self.capacity.lower_cap(self.capacity.limit // 2, self.slots)
            await self.set_in_flight(self.capacity.limit)
            self._note_recovery(recovery, memory_last_sampled_bytes=last_sampled,
                                in_flight_limit=self.capacity.limit)  # fmt: skip
            self.ready.set()
            return recovery

    async def restart_for_memory(self, cause: KvbatchError) -> Recovery | None:
        """Restart our own server, drained (nothing in flight: the caller holds the capacity exclusively), as one
        recovery: under the recovery lock, a new generation, the layout it comes back with applied before anything is
        sent again. None when the endpoint is out (its own recovery is under way: nothing to add)."""
        async with self._lock:
            if self.out:
                return None
            self.generation += 1
            recovery = await self.supervisor.restart(cause)
            await self.set_in_flight(self.capacity.limit)
            return recovery

    async def _recover_once(self, cause: KvbatchError):
        if not self.pooled or self.supervisor.restarts_itself:
            return await self.supervisor.recover(cause)
        try:
            return await asyncio.wait_for(self.supervisor.recover(cause), defaults.POOL_GRACE_S)
        except asyncio.TimeoutError as exc:
            raise ServerGoneError(f"{self.label} was not back within {defaults.POOL_GRACE_S:.0f} s") from exc

    async def probe_chat(self) -> bool:
        """One tiny chat request of our own: does the server serve others? (Whose fault a failure was.) It takes a
        place at the gate like any request, so it never runs beside a suspect's solo turn."""
        try:
            async with self.capacity.slot():  # a place, not a slot id: the server may have come back with fewer
                await self.backend.chat(dict(defaults.PROBE_BODY))
        except KvbatchError as exc:
            self.last_probe_error = exc
            return False
        return True

    def trip(self, cause: KvbatchError, generation_seen: int) -> None:
        """The failure policy found the server at fault (its breaker): take it out and probe it until it serves a
        real request again. Once per failure, whichever worker saw it first."""
        if self.out or self.generation != generation_seen:
            return
        self.generation += 1
        self._take_out(cause, restart=self.supervisor.restarts_itself)

    def _take_out(self, cause: KvbatchError, *, restart: bool = False) -> None:
        """Out of the pool, probed until it serves; `restart`: the server is ours, and up but failing every
        request (a wedged server), so it is restarted first (a restart is what brings such a server back)."""
        self.out = True
        self.out_cause = cause
        self.back.clear()
        self._out_since = time.monotonic()
        self.recorder.event("endpoint_out", endpoint=self.label, cause=str(cause)[:300])
        self.ready.set()  # workers wake, see `out`, and hand their requests back
        self._readmit = asyncio.create_task(self._probe_until_back(cause if restart else None))

    async def wait_back(self, all_done: asyncio.Event) -> bool:
        """After a hand-back: wait until the endpoint is back in the pool (True), or the batch is done without it,
        or it was given up (False: the worker stops)."""
        waits = {asyncio.ensure_future(self.back.wait()), asyncio.ensure_future(all_done.wait())}
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return self.back.is_set() and not self.out

    async def _restart(self, cause: KvbatchError) -> None:
        try:
            recovery = await self.supervisor.restart(cause)
        except KvbatchError as exc:  # it did not come back: the probes below go on, up to --max-wait
            self.last_probe_error = exc
            return
        if recovery is not None:
            self._note_recovery(recovery)

    def _note_recovery(self, recovery: Recovery, **details) -> None:
        """Count it, and log it with the layout the server came back with (the recovery's new one, or as it was)."""
        self.recorder.stats.endpoint(self.label).recoveries += 1
        self.recorder.event("recovery", endpoint=self.label,
                            **{**recovery.event_fields(self.supervisor.layout), **details})  # fmt: skip

    async def _probe_until_back(self, restart_for: KvbatchError | None = None) -> None:
        if restart_for is not None:
            await self._restart(restart_for)
        for delay in backoff_delays(1.0, defaults.BACKOFF_CAP_S):
            began = self._failing_since() if self._failing_since is not None else None
            since = min(self._out_since, began) if began is not None else self._out_since
            if time.monotonic() - since > self.max_wait_s:
                self.gave_up = True
                self.recorder.event("endpoint_given_up", endpoint=self.label, out_s=round(self.max_wait_s, 1))
                self.back.set()  # its workers wake, see it is still out, and stop
                return
            await asyncio.sleep(delay)
            # a server of ours may restart in recover(): that takes as long as a load, and is not cut short
            grace = None if self.supervisor.restarts_itself else defaults.POOL_GRACE_S
            try:
                healthy = await self.backend.health()
                if healthy:
                    await asyncio.wait_for(self.supervisor.recover(ServerGoneError("re-admission")), grace)
                    healthy = await self.probe_chat()  # serving, not only healthy
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (whatever a probe meets, the endpoint stays out: never a hang)
                healthy = False
                self.last_probe_error = exc if isinstance(exc, KvbatchError) else ServerGoneError(
                    f"{self.label}: the re-admission probe failed ({type(exc).__name__}: {exc})"
                )  # fmt: skip
            if healthy:
                if self._on_probe_served is not None:
                    self._on_probe_served(self.label)
                break
        await self.set_in_flight(self.capacity.limit)  # the layout as it came back: only its slot ids are leased
        self.recorder.stats.endpoint(self.label).out_s += time.monotonic() - self._out_since
        self.recorder.event("endpoint_back", endpoint=self.label, out_s=round(time.monotonic() - self._out_since, 1))
        self.out = False
        self.out_cause = None
        self.back.set()

    async def close(self) -> None:
        if self._readmit is not None:
            self._readmit.cancel()
        await self.supervisor.close()
