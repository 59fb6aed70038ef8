"""Drain and restart our own server when its memory passes the plan's bound: what the plan could not price (the
grammar a JSON schema makes per request, a leak in the server) is let go before the kernel's out-of-memory killer
meets it, and nothing is lost or charged: the requests in flight finish, no new one starts until the server is
back (`Capacity.exclusive`), the run goes on with the same slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from kvbatch import defaults
from kvbatch.batch.run.execution.endpoint import Endpoint
from kvbatch.batch.run.execution.recorder import Recorder
from kvbatch.errors import KvbatchError


def restart_bound(planned_bytes: int, budget_bytes: int | None = None) -> int:
    """The memory past which our own server is drained and restarted: the plan's peak and its allowance, never above
    the budget (the memory the server may use) when the plan is under it: past the budget the kernel's out-of-memory
    killer, or the card, may end the server before any drain."""
    bound = planned_bytes + max(int(planned_bytes * defaults.RESTART_ABOVE_PLAN), defaults.RESTART_ABOVE_PLAN_MIN_BYTES)
    return min(bound, budget_bytes) if budget_bytes and budget_bytes > planned_bytes else bound


class Drainer:
    """For one endpoint whose server is ours: decides, at each crossing of the bound, between a drain-and-restart
    and (when the last restart was too recent to be a leak) lowering the in-flight count."""

    def __init__(self, endpoint: Endpoint, recorder: Recorder, bound_bytes: int, *,
                 lower: Callable[[int], Awaitable[None]]) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.recorder = recorder
        self.bound_bytes = bound_bytes
        self.lower = lower
        """What the run does instead once restarting has stopped helping (the in-flight count lowered)."""
        self.restarts = 0
        self.served_at_restart = 0
        self.gave_up = False
        self._task: asyncio.Task | None = None

    def _served(self) -> int:
        return self.recorder.stats.endpoint(self.endpoint.label).completed

    async def react(self, used_bytes: int) -> bool:
        """The monitor saw memory pass the bound. Returns False to be asked again at the next sample: before every
        slot has served once the memory is the server's base, and a restart would give back nothing."""
        if self.gave_up or (self._task is not None and not self._task.done()):
            return True
        served = self._served() - self.served_at_restart
        if self.restarts == 0 and served < self.endpoint.slots:
            return False
        if self.restarts and served < defaults.RESTART_MIN_REQUESTS_PER_SLOT * self.endpoint.slots:
            self.gave_up = True
            self.recorder.event("memory_over_plan", endpoint=self.endpoint.label, used_bytes=used_bytes,
                                bound_bytes=self.bound_bytes, served_since_restart=served,
                                action="not restarted again: memory passed the bound after only "
                                       f"{served} requests since the last restart, so the plan is short, not "
                                       "leaking; the in-flight count is lowered instead")  # fmt: skip
            await self.lower(used_bytes)
            return True
        self._task = asyncio.create_task(self._drain_and_restart(used_bytes))
        return True

    async def _drain_and_restart(self, used_bytes: int) -> None:
        endpoint, label = self.endpoint, self.endpoint.label
        asked = time.monotonic()
        async with endpoint.capacity.exclusive():  # new requests wait; those in flight finish on the old server
            drained_s = time.monotonic() - asked
            cause = KvbatchError(f"memory {used_bytes / 2**20:.0f} MiB passed the plan's bound "
                                 f"{self.bound_bytes / 2**20:.0f} MiB")  # fmt: skip
            try:
                recovery = await endpoint.restart_for_memory(cause)
            except KvbatchError as exc:  # it did not come back: the endpoint's own recovery takes over
                self.recorder.event("drain_restart_failed", endpoint=label, error=str(exc)[:300])
                endpoint.trip(exc, endpoint.generation)
                return
            if recovery is None:  # the endpoint was taken out meanwhile: its re-admission restarts it
                return
            after = await endpoint.monitor.sample() if endpoint.monitor is not None else None
        endpoint.warm_slots = 0
        self.restarts += 1
        self.served_at_restart = self._served()
        backed_off = recovery is not None and recovery.out_of_memory
        self.recorder.event("drained_and_restarted", endpoint=label, before_bytes=used_bytes, after_bytes=after,
                            bound_bytes=self.bound_bytes, served_before=self.served_at_restart,
                            drained_s=round(drained_s, 2), restart_s=round(recovery.waited_s, 2) if recovery else None,
                            action=recovery.action if backed_off else "restarted, same layout")  # fmt: skip

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
