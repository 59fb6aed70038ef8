"""How many requests one endpoint has in flight, and on which of its server's slots: the one owner of that count.
Everything that changes it asks here: a phase or a concurrency trial (`want`), an out-of-memory recovery or memory
past the threshold (`lower_cap`: never raised again, so no later phase undoes it), the server's own slots after a
back-off (`want(..., slots=)`), and a request that must run alone (`exclusive`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Capacity:
    """The requests in flight on one endpoint, each holding a leased slot id: a limit that can be lowered (or
    raised, up to the cap) while requests are in flight, slot ids taken for an attempt and given back after it
    (after a back-off that halves the slots only the remaining ids are handed out, so no request names a slot the
    server no longer has), and an exclusive hold: `exclusive()` waits for every request in flight and lets no other
    in meanwhile."""

    def __init__(self, slots: int) -> None:
        self.slots = max(slots, 1)
        self.cap = self.slots
        """The most in flight from now on: lowered (never raised) after an out-of-memory or memory past the
        threshold."""
        self.limit = self.slots
        self.in_flight = 0
        self._free: set[int] = set(range(self.slots))
        """Slot ids below `slots` that no attempt holds."""
        self._exclusive = False
        self._changed = asyncio.Condition()

    def _lease(self, prefer: int | None) -> int:
        free = self._free
        chosen = prefer if prefer in free else min(free)  # its own slot when free: that slot's prefix cache is warm
        free.discard(chosen)
        self.in_flight += 1
        return chosen

    def _can_enter(self) -> bool:
        return not self._exclusive and self.in_flight < self.limit and bool(self._free)

    async def _release(self, slot: int) -> None:
        async with self._changed:
            if slot < self.slots:
                self._free.add(slot)
            self.in_flight -= 1
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def slot(self, prefer: int | None = None) -> AsyncIterator[int]:
        """Hold a place in flight with a slot id of its own (`prefer` when free) for one attempt."""
        async with self._changed:
            if not self._can_enter():
                await self._changed.wait_for(self._can_enter)
            leased = self._lease(prefer)
        try:
            yield leased
        finally:
            await self._release(leased)

    @contextlib.asynccontextmanager
    async def exclusive(self, prefer: int | None = None) -> AsyncIterator[int]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            try:
                await self._changed.wait_for(lambda: self.in_flight == 0)
            except BaseException:  # cancelled while waiting: the gate opens again for the others
                self._exclusive = False
                self._changed.notify_all()
                raise
            leased = self._lease(prefer)
        try:
            yield leased
        finally:
            await self._release(leased)
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()

    async def want(self, wanted: int, slots: int | None = None) -> int:
        """Ask for `wanted` in flight, never above the cap or the server's slots; `slots`: the slots the server has
        now (after a back-off): ids at or above it are not handed out again (those in flight finish on their
        attempt). Returns the limit granted."""
        async with self._changed:
            if slots is not None:
                held = set(range(self.slots)) - self._free
                self.slots = max(slots, 1)
                self._free = set(range(self.slots)) - held
            self.limit = max(1, min(wanted, self.cap, self.slots))
            self._changed.notify_all()
            return self.limit

    async def lower_cap(self, cap: int, slots: int | None = None) -> int:
        """Lower the cap for the rest of the run (it is never raised again), and the limit with it."""
        self.cap = max(1, min(self.cap, cap))
        return await self.want(self.limit, slots)
