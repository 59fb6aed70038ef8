"""The one writer of a run's records while it executes: journal lines (results and errors), per-request metrics,
events, the progress display, and the fsync cadence."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

from kvbatch import defaults, jsoncodec
from kvbatch.batch.inputs.answers import AnswerProblem, InvalidAnswerError
from kvbatch.batch.inputs.requests import BatchRequest
from kvbatch.batch.records import MetricLine
from kvbatch.batch.run.execution.stats import PrefixStats, RunStats
from kvbatch.batch.run.journal import Journal
from kvbatch.batch.run.progress import Progress
from kvbatch.batch.runfolder import RunFolder
from kvbatch.errors import KvbatchError
from kvbatch.serve.backends import ChatResult


class BackgroundFsync:
    """fsyncs on one worker thread, in order. A request while one is already queued (not yet started) is covered
    by it: that one starts after the request's lines were written. A failed fsync is raised on the next request."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbatch-fsync")
        self._queued: concurrent.futures.Future | None = None
        self._last: list[concurrent.futures.Future] = []

    def request(self) -> None:
        for future in [f for f in self._last if f.done()]:
            self._last.remove(future)
            future.result()  # a disk that refuses an fsync stops the run, as it did on the loop
        queued = self._queued
        if queued is not None and not queued.running() and not queued.done():
            return
        self._queued = self._pool.submit(self._sync)
        self._last.append(self._queued)

    def close(self) -> None:
        """Wait for the fsyncs in progress (the journal closes its files next)."""
        self._pool.shutdown(wait=True)
        for future in self._last:
            future.result()


class Recorder:
    def __init__(
        self,
        journal: Journal,
        folder: RunFolder,
        stats: RunStats,
        progress: Progress,
        *,
        prefix_tokens: dict[str, int],
        fsync_every: int = defaults.FSYNC_EVERY_RESULTS,
    ) -> None:
        self.journal = journal
        self.folder = folder
        self.stats = stats
        self.progress = progress
        self.prefix_tokens = prefix_tokens
        self.fsync_every = fsync_every
        self._since_sync = 0
        self._metrics = open(folder.metrics, "ab")  # noqa: SIM115 (closed in close())
        self._fsync = BackgroundFsync(journal.sync)

    def event(self, kind: str, **details: Any) -> None:
        self.folder.append_event(kind, **details)
        shown = ", ".join(f"{key}={value}" for key, value in details.items() if key != "cause")
        self.progress.note(f"{kind}: {shown}")

    def sync(self, force: bool = False) -> None:
        """Every `fsync_every` records (and when forced: a chunk's end, a phase's end) the journal is fsynced on a
        thread of its own, so the event loop never waits for the disk: each line is already in the kernel (one
        write(2) each), so a kill loses nothing; the fsync bounds what a power cut could."""
        self._since_sync += 0 if force else 1
        if force or self._since_sync >= self.fsync_every:
            self._metrics.flush()
            self._since_sync = 0
            self._fsync.request()

    def invalid_answer(self, problem: AnswerProblem, result: ChatResult, endpoint: str) -> None:
        """One answer that broke its request's response_format: counted, with the tokens and time it took (the
        request is asked again or fails)."""
        stats = self.stats
        stats.invalid_answers[problem.kind] = stats.invalid_answers.get(problem.kind, 0) + 1
        self._count_served(result, endpoint)

    def _count_served(self, result: ChatResult, endpoint: str) -> None:
        """What every answer the server gave costs, kept or asked again: tokens, time, a cut at max_tokens."""
        stats = self.stats
        stats.truncated_answers += result.finish_reason == "length"
        stats.prompt_tokens += result.prompt_tokens or 0
        stats.completion_tokens += result.completion_tokens or 0
        per_endpoint = stats.endpoint(endpoint)
        per_endpoint.prompt_tokens += result.prompt_tokens or 0
        per_endpoint.completion_tokens += result.completion_tokens or 0
        per_endpoint.busy_s += result.latency_s

    def _answers(self, answer_attempts: int, *, valid: bool) -> None:
        if answer_attempts:
            self.stats.answers_checked += 1
            self.stats.answers_valid_first += valid and answer_attempts == 1

    def success(
        self, request: BatchRequest, result: ChatResult, *, attempts: int, slot: int | None, endpoint: str,
        waited_s: float, answer_attempts: int = 0,
    ) -> None:  # fmt: skip
        self.journal.record_result(request.custom_id, result.response_body)
        stats = self.stats
        stats.completed += 1
        self._answers(answer_attempts, valid=True)
        self._count_served(result, endpoint)
        prompt = result.prompt_tokens or 0
        cached = result.cached_prompt_tokens
        stats.waited_s += waited_s
        if cached is not None:
            stats.cached_tokens += cached
            stats.cached_tokens_known += 1
        per_endpoint = stats.endpoint(endpoint)
        per_endpoint.completed += 1
        per_endpoint.cached_tokens += cached or 0
        prefix = stats.per_prefix.get(request.prefix_key) or stats.per_prefix.setdefault(request.prefix_key,
                                                                                          PrefixStats())  # fmt: skip
        prefix.requests += 1
        prefix.prompt_tokens += prompt
        prefix.cached_tokens += cached or 0
        prefix_tokens = self.prefix_tokens.get(request.prefix_key)
        if cached is not None and prefix_tokens:
            prefix.prefix_tokens += prefix_tokens
            prefix.prefix_cached_tokens += min(cached, prefix_tokens)
            prefix.misses += cached < prefix_tokens * defaults.PREFIX_HIT_SHARE
        self._metrics.write(jsoncodec.dumps_line(MetricLine(
            custom_id=request.custom_id, t_done_unix_s=round(time.time(), 3), latency_s=round(result.latency_s, 4),
            waited_s=round(waited_s, 4), prompt_tokens=result.prompt_tokens, cached_tokens=cached,
            completion_tokens=result.completion_tokens, finish_reason=result.finish_reason, prefix=request.prefix_key,
            endpoint=endpoint, slot=slot, attempts=attempts, answer_attempts=answer_attempts or None,
        )))  # fmt: skip
        self.progress.update(ok=True, cache_share=stats.cache_share())
        self.sync()

    def failure(self, request: BatchRequest, error: KvbatchError, *, attempts: int, endpoint: str,
                details: dict[str, Any] | None = None, answer_attempts: int = 0) -> None:  # fmt: skip
        self._answers(answer_attempts if isinstance(error, InvalidAnswerError) else 0, valid=False)
        self.journal.record_error(request.custom_id, type(error).__name__, error.server_message or str(error),
                                  attempts=attempts, status_code=error.status_code, details=details)  # fmt: skip
        self.stats.failed += 1
        self.stats.endpoint(endpoint).failed += 1
        self.progress.update(ok=False, cache_share=self.stats.cache_share())
        self.sync()

    def close(self) -> None:
        self._fsync.close()
        self.journal.sync()
        self._metrics.close()
