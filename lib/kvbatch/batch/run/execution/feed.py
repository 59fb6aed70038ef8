"""The feed every worker takes its next request from, and the workers of each mode. One worker per slot of each
endpoint, preferring its own slot so the slot's prefix cache stays warm. Independent: every request on its own,
its system prompt served from the slot's cache. Conversation: one growing conversation per chunk, reset between
chunks (the method that lost the original run, kept for comparison)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from kvbatch import defaults
from kvbatch.batch.inputs.requests import BatchRequest
from kvbatch.batch.run.execution.endpoint import Endpoint, EndpointOut
from kvbatch.batch.run.execution.sender import Outcome, RetryLater, Sender
from kvbatch.errors import ContextOverflowError, KvbatchError
from kvbatch.messages import message_text

if TYPE_CHECKING:
    from kvbatch.batch.run.execution.recorder import Recorder


class Feed:
    """The requests still to do. Requests handed back (a conversation ended early, an endpoint taken out) come
    first. A small look-ahead lets a worker prefer the prefix its slot already holds when several are in play.

    `outstanding` counts requests taken and not yet finished: a worker that finds the feed empty waits while
    any are outstanding (one may be handed back), and stops when none are.
    """

    def __init__(self, requests: Iterator[BatchRequest], *, lookahead: int = defaults.FEED_LOOKAHEAD) -> None:
        self._requests = requests
        self._returned: collections.deque[BatchRequest] = collections.deque()
        self._deferred: collections.deque[tuple[BatchRequest, int]] = collections.deque()
        """Requests to retry after others (with the count of requests taken when each was put here)."""
        self._taken = 0
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

    async def defer(self, request: BatchRequest) -> None:
        """Retry `request` once another has been taken: whether others succeed meanwhile tells whose fault its
        failure was (the failure policy's rule 5)."""
        self._deferred.append((request, self._taken))
        self.outstanding -= 1
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
            return self._taking(self._returned.popleft())
        if self._deferred and self._deferred[0][1] < self._taken:
            return self._taking(self._deferred.popleft()[0])
        if not self._ahead:
            self._fill()
        if not self._ahead:
            return self._taking(self._deferred.popleft()[0]) if self._deferred else None
        chosen = None
        if prefer_prefix is not None and self._ahead[0].prefix_key != prefer_prefix:
            self._fill()
            chosen = next((r for r in self._ahead if r.prefix_key == prefer_prefix), None)
            if chosen is not None:
                self._ahead.remove(chosen)
        if chosen is None:
            chosen = self._ahead.popleft()
        return self._taking(chosen)

    def _taking(self, request: BatchRequest) -> BatchRequest:
        self.outstanding += 1
        self._taken += 1
        return request

    def give_back(self, requests: list[BatchRequest]) -> None:
        self._returned.extendleft(reversed(requests))
        self.outstanding -= len(requests)

    @property
    def drained(self) -> bool:
        """Nothing left to hand out (requests in flight may still come back)."""
        if not self._ahead and not self._returned:
            self._fill()
        return self.exhausted and not self._ahead and not self._returned and not self._deferred


class _GivenUp(Exception):
    """The worker's endpoint was given up while a conversation waited for it."""


class Quota:
    """How many more requests a phase may start (None: no limit): a concurrency trial runs a fixed number."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def give_back(self) -> None:
        if self.left is not None:
            self.left += 1


class Workers:
    """What every worker shares: the feed, the sender, the recorder, the memory monitor, the chunk size."""

    def __init__(
        self, feed: Feed, sender: Sender, recorder: Recorder, *, chunk_size: int | Callable[[], int] = 1
    ) -> None:
        self.feed = feed
        self.sender = sender
        self.recorder = recorder
        self.chunk_size = chunk_size

    async def _record(self, endpoint: Endpoint, request: BatchRequest, outcome: Outcome, slot: int) -> None:
        if outcome.result is not None:
            self.recorder.success(request, outcome.result, attempts=outcome.attempts, slot=outcome.slot,
                                  endpoint=endpoint.label, waited_s=outcome.waited_s,
                                  answer_attempts=outcome.answer_attempts)  # fmt: skip
            if not endpoint.first_reply_checked:
                endpoint.first_reply_checked = True
                try:
                    await endpoint.supervisor.check_after_first_reply()
                except KvbatchError as exc:  # a ServerLimitError: the server does not give what the plan needs
                    raise self.sender.stop(exc) from exc
        else:
            assert outcome.error is not None
            self.recorder.failure(request, outcome.error, attempts=outcome.attempts, endpoint=endpoint.label,
                                  details=outcome.error.details, answer_attempts=outcome.answer_attempts)  # fmt: skip
        await self.feed.finished()

    async def independent(self, endpoint: Endpoint, slot: int, quota: Quota, warm_before: asyncio.Event | None,
                          warm_mine: asyncio.Event) -> None:  # fmt: skip
        """Take requests until the feed is done; the slot's first request waits for the previous slot's first,
        so each slot pays the system prompt once, in turn."""
        first = True
        last_prefix: str | None = None
        try:
            while quota.take():
                request = await self.feed.next(prefer_prefix=last_prefix)
                if request is None:
                    quota.give_back()
                    return
                if first and warm_before is not None:
                    await warm_before.wait()
                try:
                    outcome = await self.sender.send(endpoint, request, request.body, slot)
                except RetryLater:
                    quota.give_back()
                    await self.feed.defer(request)
                    continue
                except EndpointOut:
                    quota.give_back()
                    await self.feed.hand_back([request])
                    if not await endpoint.wait_back(self.feed.all_done):
                        return
                    continue
                await self._record(endpoint, request, outcome, slot)
                last_prefix = request.prefix_key
                if first:
                    first = False
                    warm_mine.set()
        finally:
            warm_mine.set()

    async def conversation(self, endpoint: Endpoint, slot: int, quota: Quota) -> None:
        """One conversation per chunk: system prompt once, then user/assistant turns; reset between chunks."""
        while quota.take():
            first = await self.feed.next()
            if first is None:
                quota.give_back()
                return
            try:
                await self._chunk(endpoint, slot, quota, first)
            except _GivenUp:  # the endpoint was given up: this worker stops (the others, or the run, decide)
                return
            self.recorder.sync(force=True)  # at least once per chunk

    async def _chunk(self, endpoint: Endpoint, slot: int, quota: Quota, first: BatchRequest) -> None:
        history = list(first.body["messages"][:-1])
        pending = [first]
        used_tokens = turns = 0
        while pending:
            request = pending.pop(0)
            turn_body = {**request.body, "messages": history + [request.body["messages"][-1]]}
            try:
                outcome = await self.sender.send(endpoint, request, turn_body, slot)
            except RetryLater:  # ends this conversation; the request is retried after others
                quota.give_back()
                await self.feed.defer(request)
                return
            except EndpointOut:
                quota.give_back()
                await self.feed.hand_back([request])
                if not await endpoint.wait_back(self.feed.all_done):
                    raise _GivenUp from None
                return
            if outcome.result is None and isinstance(outcome.error, ContextOverflowError) and turns > 0:
                quota.give_back()
                await self.feed.hand_back([request])  # ends this conversation; the request starts the next one
                self.recorder.event("chunk_end", reason="context full", turns=turns, used_tokens=used_tokens)
                return
            await self._record(endpoint, request, outcome, slot)
            if outcome.result is None:
                continue
            turns += 1
            history += [request.body["messages"][-1], {"role": "assistant", "content": outcome.result.text}]
            used_tokens = (outcome.result.prompt_tokens or 0) + (outcome.result.completion_tokens or 0)
            limit = self.chunk_size() if callable(self.chunk_size) else self.chunk_size
            if turns >= limit or not quota.take():
                return
            following = self.feed.take()
            if following is None:
                quota.give_back()
                return
            reason = self._end_reason(endpoint, first, following, used_tokens)
            if reason:
                quota.give_back()
                await self.feed.hand_back([following])
                if reason != "another prefix":
                    self.recorder.event("chunk_end", reason=reason, turns=turns, used_tokens=used_tokens)
                return
            pending.append(following)

    def _end_reason(self, endpoint: Endpoint, first: BatchRequest, following: BatchRequest, used: int) -> str | None:
        if following.prefix_key != first.prefix_key:
            return "another prefix"
        if endpoint.monitor is not None and endpoint.monitor.above:
            return "memory threshold"
        room = endpoint.supervisor.layout.slot_context_tokens * defaults.CHUNK_CONTEXT_SHARE
        if used + _estimated_turn_tokens(following) > room:
            return "context nearly full"
        return None


def _estimated_turn_tokens(request: BatchRequest) -> int:
    text = message_text(request.body["messages"][-1]) or ""
    answer = request.body.get("max_tokens") or request.body.get("max_completion_tokens") or defaults.DEFAULT_MAX_TOKENS
    return len(text) // defaults.TURN_CHARS_PER_TOKEN + int(answer) + defaults.TURN_OVERHEAD_TOKENS
