"""Flow control: a gate that bounds the requests in flight on one endpoint (and can be held exclusively, to run a
suspect request alone), and the feed every worker takes its next request from."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Iterator

from kvbatch.batch.requests import BatchRequest


class Gate:
    """A semaphore whose limit can be lowered (or raised) while requests are in flight, and that can be held
    exclusively: `exclusive()` waits for every request in flight to finish and lets no other in meanwhile."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.in_flight = 0
        self._exclusive = False
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive and self.in_flight < self.limit)
            self.in_flight += 1
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            await self._changed.wait_for(lambda: self.in_flight == 0)
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()

    async def set_limit(self, limit: int) -> None:
        async with self._changed:
            self.limit = max(1, limit)
            self._changed.notify_all()


class Feed:
    """The requests still to do. Requests handed back (a conversation ended early, an endpoint taken out) come
    first. A small look-ahead lets a worker prefer the prefix its slot already holds when several are in play.

    `outstanding` counts requests taken and not yet finished: a worker that finds the feed empty waits while
    any are outstanding (one may be handed back), and stops when none are.
    """

    def __init__(self, requests: Iterator[BatchRequest], *, lookahead: int = 64) -> None:
        self._requests = requests
        self._returned: collections.deque[BatchRequest] = collections.deque()
        self._ahead: collections.deque[BatchRequest] = collections.deque()
        self._lookahead = lookahead
        self.exhausted = False
        self.outstanding = 0
        self.all_done = asyncio.Event()
        """Set when every request has an outcome: nothing to hand out, nothing in flight."""
        self._changed = asyncio.Condition()

    async def next(self, prefer_prefix: str | None = None) -> BatchRequest | None:
        """The next request, waiting while others are outstanding; None when the batch is done."""
        while True:
            request = self.take(prefer_prefix)
            if request is not None or self.outstanding == 0:
                return request
            async with self._changed:
                await self._changed.wait()

    async def finished(self, count: int = 1) -> None:
        """`count` taken requests are done (recorded as a success or a failure)."""
        self.outstanding -= count
        if self.outstanding == 0 and self.drained:
            self.all_done.set()
        async with self._changed:
            self._changed.notify_all()

    async def hand_back(self, requests: list[BatchRequest]) -> None:
        self.give_back(requests)
        async with self._changed:
            self._changed.notify_all()

    def _fill(self) -> None:
        while not self.exhausted and len(self._ahead) < self._lookahead:
            try:
                self._ahead.append(next(self._requests))
            except StopIteration:
                self.exhausted = True

    def take(self, prefer_prefix: str | None = None) -> BatchRequest | None:
        if self._returned:
            self.outstanding += 1
            return self._returned.popleft()
        if not self._ahead:
            self._fill()
        if not self._ahead:
            return None
        chosen = None
        if prefer_prefix is not None and self._ahead[0].prefix_key != prefer_prefix:
            self._fill()
            chosen = next((r for r in self._ahead if r.prefix_key == prefer_prefix), None)
            if chosen is not None:
                self._ahead.remove(chosen)
        if chosen is None:
            chosen = self._ahead.popleft()
        self.outstanding += 1
        return chosen

    def give_back(self, requests: list[BatchRequest]) -> None:
        self._returned.extendleft(reversed(requests))
        self.outstanding -= len(requests)

    @property
    def drained(self) -> bool:
        """Nothing left to hand out (requests in flight may still come back)."""
        if not self._ahead and not self._returned:
            self._fill()
        return self.exhausted and not self._ahead and not self._returned
