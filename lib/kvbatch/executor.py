"""The chunked batch executor: independent prefix-cached requests (default) or one conversation per chunk,
bounded concurrency, exactly-once journaling, recovery from out-of-memory and crashes, memory monitoring.

Async core: one task per worker pulls from a shared feed; a gate bounds the requests in flight and can be
lowered while running; one recovery at a time pauses everyone, then the failed requests are retried.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvbatch.backends import ChatResult
from kvbatch.batchio import BatchRequest
from kvbatch.errors import (
    BadRequestError,
    ContextOverflowError,
    KvbatchError,
    NotFoundError,
    ServerBusyError,
    ServerGoneError,
)
from kvbatch.journal import Journal
from kvbatch.monitor import MemoryMonitor
from kvbatch.progress import Progress
from kvbatch.supervisor import Supervisor


@dataclass
class RunOptions:
    mode: str = "independent"
    concurrency: int | str = "auto"
    concurrency_candidates: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    trial_requests_per_slot: int = 3
    chunk_size: int = 1
    slot_context_tokens: int = 4096
    max_attempts: int = 4
    sync_every: int = 32
    memory_threshold_bytes: int | None = None
    memory_interval_s: float = 1.0
    progress: bool = True
    request_timeout_s: float = 600.0


class Gate:
    """A semaphore whose limit can be lowered (or raised) while requests are in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.in_flight = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    async def set_limit(self, limit: int) -> None:
        async with self._changed:
            self.limit = max(1, limit)
            self._changed.notify_all()


class Feed:
    """The requests still to do, with a front queue for ones handed back (a conversation ended early)."""

    def __init__(self, requests: Iterator[BatchRequest]) -> None:
        self._requests = requests
        self._returned: collections.deque[BatchRequest] = collections.deque()
        self.exhausted = False

    def take(self) -> BatchRequest | None:
        if self._returned:
            return self._returned.popleft()
        if self.exhausted:
            return None
        try:
            return next(self._requests)
        except StopIteration:
            self.exhausted = True
            return None

    def give_back(self, requests: list[BatchRequest]) -> None:
        self._returned.extendleft(reversed(requests))


@dataclass
class PrefixStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefix_tokens: int = 0
    prefix_cached_tokens: int = 0
    """Of each request's shared-prefix tokens, how many came from the cache (cached tokens capped at the prefix)."""
    misses: int = 0


@dataclass
class RunStats:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_tokens_known: int = 0
    completion_tokens: int = 0
    started_unix_s: float = field(default_factory=time.time)
    per_prefix: dict[str, PrefixStats] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)

    def cache_share(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens and self.cached_tokens_known else None

    def system_prompt_share(self) -> float | None:
        """Share of the shared-prefix (system prompt) tokens served from the cache, over all prefixes."""
        total = sum(p.prefix_tokens for p in self.per_prefix.values())
        return sum(p.prefix_cached_tokens for p in self.per_prefix.values()) / total if total else None


class Executor:
    """Runs requests through a supervised server into a journal. Construct, then `await run(requests)`."""

    def __init__(
        self,
        journal: Journal,
        supervisor: Supervisor,
        options: RunOptions,
        *,
        run_dir: Path,
        prefix_tokens: dict[str, int] | None = None,
        total: int | None = None,
    ) -> None:
        self.journal = journal
        self.supervisor = supervisor
        self.options = options
        self.run_dir = run_dir
        self.prefix_tokens = prefix_tokens or {}
        self.total = total
        self.stats = RunStats()
        self.gate = Gate(1)
        self._ready = asyncio.Event()
        self._ready.set()
        self._recover_lock = asyncio.Lock()
        self._generation = 0
        self._events_path = run_dir / "events.jsonl"
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in run)
        self._since_sync = 0
        self.progress: Progress | None = None
        self.monitor: MemoryMonitor | None = None
        self.fatal: KvbatchError | None = None

    # ---- bookkeeping -------------------------------------------------------------------------------------
    def event(self, kind: str, **details: Any) -> None:
        record = {"t_unix_s": time.time(), "event": kind, **details}
        with open(self._events_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.progress:
            shown = ", ".join(f"{key}={value}" for key, value in details.items() if key not in ("cause",))
            self.progress.note(f"{kind}: {shown}")

    def _maybe_sync(self, force: bool = False) -> None:
        self._since_sync += 1
        if force or self._since_sync >= self.options.sync_every:
            self.journal.sync()
            self._metrics.flush()
            self._since_sync = 0

    def _record_success(
        self, request: BatchRequest, result: ChatResult, attempts: int, slot: int | None, started_s: float
    ) -> None:
        self.journal.record_result(request.custom_id, result.response_body)
        stats = self.stats
        stats.completed += 1
        prompt = result.prompt_tokens or 0
        cached = result.cached_prompt_tokens
        stats.prompt_tokens += prompt
        stats.completion_tokens += result.completion_tokens or 0
        if cached is not None:
            stats.cached_tokens += cached
            stats.cached_tokens_known += 1
        prefix = stats.per_prefix.setdefault(request.prefix_key, PrefixStats())
        prefix.requests += 1
        prefix.prompt_tokens += prompt
        prefix.cached_tokens += cached or 0
        prefix_tokens = self.prefix_tokens.get(request.prefix_key)
        if cached is not None and prefix_tokens:
            prefix.prefix_tokens += prefix_tokens
            prefix.prefix_cached_tokens += min(cached, prefix_tokens)
            if cached < prefix_tokens * 0.9:
                prefix.misses += 1
        self._metrics.write(
            json.dumps(
                {
                    "custom_id": request.custom_id,
                    "t_done_unix_s": time.time(),
                    "latency_s": round(result.latency_s, 4),
                    "queue_and_retry_s": round(time.perf_counter() - started_s - result.latency_s, 4),
                    "prompt_tokens": result.prompt_tokens,
                    "cached_tokens": cached,
                    "completion_tokens": result.completion_tokens,
                    "finish_reason": result.finish_reason,
                    "prefix": request.prefix_key,
                    "slot": slot,
                    "attempts": attempts,
                }
            )
            + "\n"
        )
        if self.progress:
            self.progress.update(ok=True, cache_share=stats.cache_share())
        self._maybe_sync()

    def _record_failure(self, request: BatchRequest, error: KvbatchError, attempts: int) -> None:
        code = type(error).__name__
        self.journal.record_error(
            request.custom_id,
            code,
            error.server_message or str(error),
            attempts=attempts,
            status_code=error.status_code,
        )
        self.stats.failed += 1
        if self.progress:
            self.progress.update(ok=False, cache_share=self.stats.cache_share())
        self._maybe_sync()

    # ---- one request, with retries -----------------------------------------------------------------------
    async def _recover(self, cause: KvbatchError, generation_seen: int) -> None:
        async with self._recover_lock:
            if self._generation != generation_seen:
                return  # another worker already recovered from the same failure
            self._ready.clear()
            try:
                recovery = await self.supervisor.recover(cause)
            except KvbatchError as exc:
                self.fatal = exc
                raise
            finally:
                self._generation += 1
            if recovery.out_of_memory and self.gate.limit > 1:
                await self.gate.set_limit(self.gate.limit // 2)
            self.event("recovery", **asdict(recovery), in_flight_limit=self.gate.limit, slots=self.supervisor.slots)
            self._ready.set()

    async def send(
        self, request: BatchRequest, body: dict[str, Any], slot: int | None
    ) -> tuple[ChatResult | None, KvbatchError | None, int]:
        """Send with retries. Returns (result, None, attempts) or (None, final_error, attempts)."""
        attempts = 0
        while True:
            attempts += 1
            await self._ready.wait()
            if self.fatal:
                raise self.fatal
            generation = self._generation
            if slot is not None and self.supervisor.slot_pinning:
                body = {**body, "id_slot": slot % self.supervisor.slots}
            error: KvbatchError | None = None
            async with self.gate:
                try:
                    return (
                        await self.supervisor.backend.chat(body, timeout_s=self.options.request_timeout_s),
                        None,
                        attempts,
                    )
                except (BadRequestError, NotFoundError, ServerBusyError, ServerGoneError) as exc:
                    error = exc  # handled below, outside the gate, so a recovery does not hold a slot
            if isinstance(error, NotFoundError):
                self.fatal = error
                raise error
            if isinstance(error, BadRequestError) and "id_slot" in body and "slot" in str(error).lower():
                self.supervisor.slot_pinning = False  # a server that rejects slot ids: let it choose
                continue
            if isinstance(error, BadRequestError) or attempts >= self.options.max_attempts:
                return None, error, attempts
            self.stats.retried += 1
            if isinstance(error, ServerBusyError):
                await asyncio.sleep(min(0.5 * 2**attempts, 30))
            else:
                await self._recover(error, generation)

    async def _independent(self, request: BatchRequest, slot: int) -> None:
        started = time.perf_counter()
        result, error, attempts = await self.send(request, request.body, slot)
        if result is not None:
            self._record_success(request, result, attempts, slot, started)
        else:
            assert error is not None
            self._record_failure(request, error, attempts)

    # ---- workers -----------------------------------------------------------------------------------------
    async def _independent_worker(self, index: int, feed: Feed, budget: list[int], warm: list[asyncio.Event]) -> None:
        first = True
        while True:
            if budget[0] == 0:
                return
            request = feed.take()
            if request is None:
                return
            budget[0] -= 1
            if first and index > 0:
                await warm[index - 1].wait()  # warm each slot with one request, one slot after another
            try:
                await self._independent(request, index)
            finally:
                if first:
                    warm[index].set()
                    first = False

    async def _conversation_worker(self, index: int, feed: Feed, budget: list[int]) -> None:
        """One conversation per chunk: system prompt once, then user/assistant turns; reset between chunks."""
        while budget[0] != 0:
            first = feed.take()
            if first is None:
                return
            history = list(first.body["messages"][:-1])
            pending = [first]
            used_tokens = 0
            turns = 0
            while pending:
                request = pending.pop(0)
                budget[0] -= 1
                turn_body = {**request.body, "messages": history + [request.body["messages"][-1]]}
                started = time.perf_counter()
                result, error, attempts = await self.send(request, turn_body, index)
                if result is None:
                    assert error is not None
                    if isinstance(error, ContextOverflowError) and turns > 0:
                        budget[0] += 1
                        feed.give_back([request])  # ends this conversation; the request starts the next one
                        self.event("chunk_end", reason="context full", turns=turns, used_tokens=used_tokens)
                        break
                    self._record_failure(request, error, attempts)
                    continue
                self._record_success(request, result, attempts, index, started)
                turns += 1
                history += [request.body["messages"][-1], {"role": "assistant", "content": result.text}]
                used_tokens = (result.prompt_tokens or 0) + (result.completion_tokens or 0)
                if turns >= self.options.chunk_size or budget[0] == 0:
                    break
                next_request = feed.take()
                if next_request is None:
                    break
                if next_request.prefix_key != first.prefix_key:
                    feed.give_back([next_request])
                    break
                if self.monitor is not None and self.monitor.above:
                    feed.give_back([next_request])
                    self.event("chunk_end", reason="memory threshold", turns=turns, used_tokens=used_tokens)
                    break
                room_needed = used_tokens + _estimated_turn_tokens(next_request)
                if room_needed > self.options.slot_context_tokens * 0.95:
                    feed.give_back([next_request])
                    self.event("chunk_end", reason="context nearly full", turns=turns, used_tokens=used_tokens)
                    break
                pending.append(next_request)
            self._maybe_sync(force=True)  # at least once per chunk

    def _finished(self) -> int:
        return self.stats.completed + self.stats.failed

    async def _phase(self, feed: Feed, workers: int, limit: int | None) -> tuple[int, float]:
        """Run up to `limit` requests (all when None) with `workers` in flight.

        Returns (requests done after every slot was warm, seconds since then): the steady rate, which is
        what the concurrency choice must compare (cold first requests would favour whichever ran longest).
        """
        await self.gate.set_limit(workers)
        budget = [limit if limit is not None else -1]
        warm_mark: list[tuple[float, int]] = []
        if self.options.mode == "conversation":
            warm_mark.append((time.perf_counter(), self._finished()))
            tasks = [self._conversation_worker(i, feed, budget) for i in range(workers)]
        else:
            warm = [asyncio.Event() for _ in range(workers)]

            async def mark_when_warm() -> None:
                await warm[-1].wait()
                warm_mark.append((time.perf_counter(), self._finished()))

            tasks = [self._independent_worker(i, feed, budget, warm) for i in range(workers)]
            tasks.append(mark_when_warm())
        runner = asyncio.gather(*tasks[:workers])
        marker = asyncio.ensure_future(tasks[workers]) if len(tasks) > workers else None
        await runner
        if marker is not None and not marker.done():
            marker.cancel()
        self._maybe_sync(force=True)
        if not warm_mark:
            return 0, 0.0
        mark_time, mark_count = warm_mark[0]
        return self._finished() - mark_count, time.perf_counter() - mark_time

    async def _choose_concurrency(self, feed: Feed) -> int:
        """`auto`: try a few in-flight counts on real requests of the batch (results kept); keep the fastest."""
        best, best_rate = 1, 0.0
        candidates = [c for c in self.options.concurrency_candidates if c <= max(self.supervisor.slots, 1)] or [1]
        candidates = [c for c in candidates if c <= max(self.total or 1, 1)] or [1]
        if len(candidates) == 1:
            return candidates[0]
        for count in candidates:
            trial = count * (self.options.trial_requests_per_slot + 1)
            done, seconds = await self._phase(feed, count, trial)
            rate = done / seconds if seconds else 0.0
            self.stats.trials.append(
                {"in_flight": count, "requests": done, "seconds": round(seconds, 3), "requests_per_s": round(rate, 4)}
            )
            self.event("concurrency_trial", in_flight=count, requests=done, requests_per_s=round(rate, 4))
            if feed.exhausted and done < trial:
                break
            if rate <= best_rate * 1.05:
                break  # no longer scaling: on 2 CPU cores this stops after trying 2
            best, best_rate = count, rate
        self.event("concurrency_chosen", in_flight=best)
        return best

    async def _on_memory_high(self, used_bytes: int) -> None:
        if self.gate.limit > 1:
            await self.gate.set_limit(self.gate.limit - 1)
        self.event("memory_high", used_bytes=used_bytes, action=f"in-flight limit now {self.gate.limit}")

    async def run(self, requests: Iterator[BatchRequest]) -> RunStats:
        feed = Feed(requests)
        self.progress = Progress(total=self.total, enabled=self.options.progress)
        self.monitor = MemoryMonitor(
            self.supervisor,
            self.run_dir / "memory.csv",
            interval_s=self.options.memory_interval_s,
            threshold_bytes=self.options.memory_threshold_bytes,
            on_high=self._on_memory_high,
        )
        monitor_task = asyncio.create_task(self.monitor.run())
        try:
            if self.options.concurrency == "auto":
                in_flight = await self._choose_concurrency(feed)
            else:
                in_flight = int(self.options.concurrency)
            await self._phase(feed, in_flight, None)
        finally:
            monitor_task.cancel()
            await asyncio.gather(monitor_task, return_exceptions=True)
            self.journal.sync()
            self._metrics.close()
            self.progress.close()
        return self.stats


def _estimated_turn_tokens(request: BatchRequest) -> int:
    text = request.body["messages"][-1].get("content", "")
    text_chars = len(text) if isinstance(text, str) else 0
    return (
        text_chars // 3 + int(request.body.get("max_tokens") or request.body.get("max_completion_tokens") or 512) + 16
    )
