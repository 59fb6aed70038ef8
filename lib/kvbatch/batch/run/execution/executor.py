"""The batch executor: independent prefix-cached requests (default) or one conversation per chunk, over one or
more endpoints, with bounded concurrency, exactly-once journaling, recovery, and memory monitoring.

Async core: per endpoint, one worker per slot pulls from a shared feed; each endpoint's gate bounds its requests
in flight; one recovery at a time per endpoint pauses its workers, then the failed requests are retried.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvbatch import defaults
from kvbatch.batch.inputs.requests import BatchRequest
from kvbatch.batch.run.execution.drain import Drainer
from kvbatch.batch.run.execution.endpoint import Endpoint
from kvbatch.batch.run.execution.feed import Feed, Quota, Workers
from kvbatch.batch.run.execution.guard import TruncationGuard
from kvbatch.batch.run.execution.policy import FailurePolicy
from kvbatch.batch.run.execution.recorder import Recorder
from kvbatch.batch.run.execution.sender import RunStopped, Sender
from kvbatch.batch.run.execution.stats import RunStats
from kvbatch.batch.run.execution.trials import ConcurrencyTrials
from kvbatch.batch.run.journal import Journal
from kvbatch.batch.run.monitor import MemoryLine, MemoryMonitor
from kvbatch.batch.run.progress import Progress
from kvbatch.batch.runfolder import RunFolder
from kvbatch.errors import ServerGoneError
from kvbatch.serve.supervisor import Supervisor


@dataclass
class RunOptions:
    mode: str = "independent"
    concurrency: int | str = "auto"
    trials: ConcurrencyTrials = field(default_factory=ConcurrencyTrials)
    chunk_size: int | Callable[[], int] = 1
    """Requests per conversation, or how to read it from the plan (which a back-off may change)."""
    max_attempts: int = defaults.MAX_ATTEMPTS
    answer_attempts: int = defaults.ANSWER_ATTEMPTS
    max_wait_s: float = defaults.MAX_WAIT_S
    memory_threshold_bytes: int | None = None
    restart_bounds: list[int | None] = field(default_factory=list)
    """Per supervisor: the memory past which that server (when ours) is drained and restarted; None: never."""
    memory_interval_s: float = defaults.MEMORY_SAMPLE_S
    progress: bool = True
    estimated_seconds: float | None = None
    """The plan's estimate, which the run re-makes from its own rate after its first minutes."""


class Executor:
    """Runs requests through supervised servers into a journal. Construct, then `await run(requests)`."""

    def __init__(
        self,
        journal: Journal,
        supervisors: list[Supervisor],
        options: RunOptions,
        *,
        folder: RunFolder,
        prefix_tokens: dict[str, int] | None = None,
        total: int | None = None,
        guard: TruncationGuard | None = None,
    ) -> None:
        self.journal = journal
        self.supervisors = supervisors
        self.options = options
        self.folder = folder
        self.prefix_tokens = prefix_tokens or {}
        self.total = total
        self.guard = guard
        self.stats = RunStats()
        self.endpoints: list[Endpoint] = []
        self.recorder: Recorder | None = None
        self.re_estimate_s: float | None = None

    def _labels(self) -> list[str]:
        labels = [s.label for s in self.supervisors]
        if len(set(labels)) == len(labels):
            return labels
        return [f"{label}-{i}" for i, label in enumerate(labels)]

    async def _phase(self, workers: Workers, in_flight: dict[Endpoint, int], limit: int | None) -> tuple[int, float]:
        """Run with `in_flight[e]` workers on each endpoint: all requests when `limit` is None, else until `limit`
        more have been started once every slot is warm (the slots warm one after another, while the warm ones
        serve: a quota that counted those would leave a large count almost nothing to measure). Returns (requests
        done after every slot was warm, seconds since then): the steady rate."""
        quota = Quota(None)
        tasks: list[asyncio.Task] = []
        warm_events: list[asyncio.Event] = []
        for endpoint, wanted in in_flight.items():
            count = await endpoint.set_in_flight(wanted)
            # Slots with their own prefix cache (llama-server) warm one after another, each paying the system prompt
            # once; a server with one shared prefix cache (vLLM, SGLang) needs only the first request to go first.
            backend = endpoint.backend
            per_slot = not (backend.name == "openai" and not getattr(backend, "slot_pinning", False))
            previous: asyncio.Event | None = None
            for slot in range(count):
                mine = asyncio.Event()
                warm_events.append(mine)
                if slot < endpoint.warm_slots:  # warmed by an earlier phase (a concurrency trial): its cache holds
                    mine.set()
                if self.options.mode == "conversation":
                    tasks.append(asyncio.create_task(workers.conversation(endpoint, slot, quota)))
                else:
                    before = None if slot < endpoint.warm_slots else previous
                    tasks.append(asyncio.create_task(workers.independent(endpoint, slot, quota, before, mine)))
                if per_slot or previous is None:
                    previous = mine
            endpoint.warm_slots = max(endpoint.warm_slots, count)
        warm_mark: list[tuple[float, int]] = []
        if self.options.mode == "conversation":
            warm_mark.append((time.perf_counter(), self.stats.finished))
            quota.left = limit

        async def mark_when_warm() -> None:
            for event in warm_events:
                await event.wait()
            warm_mark.append((time.perf_counter(), self.stats.finished))
            quota.left = limit

        marker = asyncio.create_task(mark_when_warm())
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            marker.cancel()
            self.recorder.sync(force=True)
        if not warm_mark:
            return 0, 0.0
        mark_time, mark_count = warm_mark[0]
        return self.stats.finished - mark_count, time.perf_counter() - mark_time

    async def _on_memory_high(self, endpoint: Endpoint, used_bytes: int) -> None:
        if endpoint.capacity.limit > 1:
            await endpoint.capacity.lower_cap(endpoint.capacity.limit - 1, endpoint.slots)
        self.recorder.event("memory_high", endpoint=endpoint.label, used_bytes=used_bytes,
                            action=f"in-flight limit now {endpoint.capacity.limit}")  # fmt: skip

    async def _re_estimate(self, progress: Progress) -> None:
        """After the first minutes, re-make the time estimate from the run's own rate (the ETA the progress shows)."""
        await asyncio.sleep(defaults.ESTIMATE_REFRESH_S)
        if progress.rate() and self.total:
            self.re_estimate_s = progress.elapsed_s() + (self.total - progress.done) / progress.rate()
            self.recorder.event("estimate", total_s=round(self.re_estimate_s, 1),
                                plan_estimate_s=self.options.estimated_seconds)  # fmt: skip

    def _given_up(self) -> ServerGoneError:
        """One sentence for a run that stopped because no server served for --max-wait: which, what it answered,
        that nothing was charged to the requests, and what to do."""
        wait = f"{self.options.max_wait_s:.0f} s (--max-wait)"
        if len(self.endpoints) == 1:
            endpoint = self.endpoints[0]
            probe = f"; it still failed a test request after {wait}: {endpoint.last_probe_error}" if (
                endpoint.last_probe_error) else f" and was not back after {wait}"  # fmt: skip
            return ServerGoneError(
                f"{endpoint.label} stopped serving: {endpoint.out_cause}{probe}. Nothing was charged to those "
                "requests and every finished one is saved: restart the server (a wedged vLLM or Ollama answers "
                "/health while failing every request), then run the same command again"
            )
        return ServerGoneError(
            f"every server was out of the pool for {wait} ("
            + "; ".join(f"{e.label}: {e.out_cause}" for e in self.endpoints)
            + "); nothing was charged to their requests and every finished one is saved: run the same command "
            "again once they are back"
        )

    async def run(self, requests: Iterator[BatchRequest]) -> RunStats:
        feed = Feed(requests)
        progress = Progress(total=self.total, enabled=self.options.progress)
        self.recorder = recorder = Recorder(self.journal, self.folder, self.stats, progress,
                                            prefix_tokens=self.prefix_tokens)  # fmt: skip
        pooled = len(self.supervisors) > 1
        policy = FailurePolicy(self.options.max_attempts)
        self.endpoints = [
            Endpoint(
                s,
                label=label,
                recorder=recorder,
                pooled=pooled,
                max_wait_s=self.options.max_wait_s,
                on_probe_served=policy.probe_served,
                failing_since=lambda label=label: policy.breaker(label).failing_since,
            )  # fmt: skip
            for s, label in zip(self.supervisors, self._labels(), strict=True)
        ]
        sender = Sender(
            recorder,
            self.guard,
            policy=policy,
            max_wait_s=self.options.max_wait_s,
            answer_attempts=self.options.answer_attempts,
        )
        sender.others_waiting = lambda: not feed.drained
        workers = Workers(feed, sender, recorder, chunk_size=self.options.chunk_size)
        background = [asyncio.create_task(self._re_estimate(progress))]
        drainers: list[Drainer] = []
        for index, endpoint in enumerate(self.endpoints):
            endpoint.monitor = MemoryMonitor(endpoint.supervisor, self.folder.memory, label=endpoint.label,
                                             interval_s=self.options.memory_interval_s)  # fmt: skip
            lower = functools.partial(self._on_memory_high, endpoint)
            if self.options.memory_threshold_bytes:
                endpoint.monitor.add_line(MemoryLine(self.options.memory_threshold_bytes, lower))
            bound = self.options.restart_bounds[index] if index < len(self.options.restart_bounds) else None
            if bound and endpoint.supervisor.restarts_itself:
                drainer = Drainer(endpoint, recorder, bound, lower=lower)
                drainers.append(drainer)
                endpoint.monitor.add_line(MemoryLine(bound, drainer.react))
            background.append(asyncio.create_task(endpoint.monitor.run()))
        try:
            if self.options.concurrency == "auto" and not pooled:
                only = self.endpoints[0]

                async def phase(count: int, limit: int | None) -> tuple[int, float]:
                    return await self._phase(workers, {only: count}, limit)

                chosen = await self.options.trials.choose(phase, feed, slots=only.slots, total=self.total,
                                                          recorder=recorder)  # fmt: skip
                in_flight = {only: chosen}
            elif self.options.concurrency == "auto":  # a pool: each endpoint's own slots (unknown ones: a few)
                in_flight = {e: e.slots if e.slots != defaults.UNKNOWN_SERVER_SLOTS else defaults.POOLED_UNKNOWN_SLOTS
                             for e in self.endpoints}  # fmt: skip
            else:
                in_flight = {e: int(self.options.concurrency) for e in self.endpoints}
            await self._phase(workers, in_flight, None)
            if not feed.all_done.is_set() and all(e.gave_up for e in self.endpoints):
                raise RunStopped(self._given_up())
        except RunStopped as stopped:
            raise stopped.error from None
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, *(d.close() for d in drainers), return_exceptions=True)
            recorder.close()
            progress.close()
        return self.stats
