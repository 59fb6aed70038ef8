"""The workers of each mode. One worker per slot of each endpoint, pinned to its slot so the slot's prefix cache
stays warm. Independent: every request on its own, its system prompt served from the slot's cache. Conversation:
one growing conversation per chunk, reset between chunks (the method that lost the original run, kept for
comparison)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvbatch.batch.execution.endpoint import Endpoint, EndpointOut
from kvbatch.batch.execution.sender import Outcome, Sender
from kvbatch.batch.requests import BatchRequest, message_text
from kvbatch.errors import ContextOverflowError, KvbatchError

if TYPE_CHECKING:
    from kvbatch.batch.execution.gate import Feed
    from kvbatch.batch.execution.recorder import Recorder


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
            self.recorder.success(request, outcome.result, attempts=outcome.attempts, slot=slot,
                                  endpoint=endpoint.label, waited_s=outcome.waited_s)  # fmt: skip
            if not endpoint.first_reply_checked:
                endpoint.first_reply_checked = True
                try:
                    await endpoint.supervisor.check_after_first_reply()
                except KvbatchError as exc:  # a ServerLimitError: the server does not give what the plan needs
                    raise self.sender.stop(exc) from exc
        else:
            assert outcome.error is not None
            self.recorder.failure(request, outcome.error, attempts=outcome.attempts, endpoint=endpoint.label,
                                  details=outcome.error.details)  # fmt: skip
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
            await self._chunk(endpoint, slot, quota, first)
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
            except EndpointOut:
                quota.give_back()
                await self.feed.hand_back([request])
                await endpoint.wait_back(self.feed.all_done)
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
        if used + _estimated_turn_tokens(following) > endpoint.supervisor.layout.slot_context_tokens * 0.95:
            return "context nearly full"
        return None


def _estimated_turn_tokens(request: BatchRequest) -> int:
    text = message_text(request.body["messages"][-1]) or ""
    answer = request.body.get("max_tokens") or request.body.get("max_completion_tokens") or 512
    return len(text) // 3 + int(answer) + 16
