"""Sending one request until it has an outcome, following the failure policy (policy.py): success, a failure
for good, a hand-back to the pool, or a stop of the whole run."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from kvbatch import defaults
from kvbatch.batch.execution.endpoint import Endpoint, EndpointOut
from kvbatch.batch.execution.guard import TruncationGuard
from kvbatch.batch.execution.policy import SuspectTracker, Verdict, verdict
from kvbatch.batch.execution.recorder import Recorder
from kvbatch.batch.requests import BatchRequest
from kvbatch.errors import KvbatchError, ServerGoneError, ServerUnreachableError
from kvbatch.serve.backends import ChatResult
from kvbatch.serve.supervisor import backoff_delays


@dataclass
class Outcome:
    result: ChatResult | None
    error: KvbatchError | None
    attempts: int
    waited_s: float


class RunStopped(Exception):
    """The run must stop (authentication, a missing model, a capped context, a server gone for too long)."""

    def __init__(self, error: KvbatchError) -> None:
        super().__init__(str(error))
        self.error = error


class Sender:
    def __init__(
        self,
        recorder: Recorder,
        guard: TruncationGuard | None,
        *,
        tracker: SuspectTracker,
        max_wait_s: float = defaults.MAX_WAIT_S,
        request_timeout_s: float = defaults.REQUEST_TIMEOUT_S,
    ) -> None:
        self.recorder = recorder
        self.guard = guard
        self.tracker = tracker
        self.max_wait_s = max_wait_s
        self.request_timeout_s = request_timeout_s
        self.fatal: KvbatchError | None = None

    def stop(self, error: KvbatchError) -> RunStopped:
        self.fatal = self.fatal or error
        return RunStopped(self.fatal)

    async def send(self, endpoint: Endpoint, request: BatchRequest, body: dict[str, Any], slot: int | None) -> Outcome:
        """Send until there is an outcome. Raises EndpointOut (hand the request back) or RunStopped."""
        attempts = 0
        waited = 0.0
        delays = backoff_delays()
        while True:
            if self.fatal:
                raise RunStopped(self.fatal)
            started_wait = time.perf_counter()
            await endpoint.ready.wait()
            waited += time.perf_counter() - started_wait
            if endpoint.fatal:
                raise self.stop(endpoint.fatal)
            if endpoint.out:
                raise EndpointOut
            generation = endpoint.generation
            alone = self.tracker.is_suspect(request.custom_id)
            result: ChatResult | None = None
            error: KvbatchError | None = None
            async with endpoint.gate.exclusive() if alone else endpoint.gate.slot():
                if endpoint.generation != generation or endpoint.out:
                    continue  # the server was recovered (or taken out) while this request waited for the gate
                attempts += 1
                try:
                    result = await endpoint.backend.chat(body, slot=slot, timeout_s=self.request_timeout_s)
                except KvbatchError as exc:
                    error = exc
            if result is not None:
                self.tracker.cleared(request.custom_id)
                truncated = self.guard.check(request, result) if self.guard else None
                if truncated is not None:
                    return Outcome(None, truncated, attempts, waited)
                return Outcome(result, None, attempts, waited)
            assert error is not None
            action = verdict(error)
            if action is Verdict.STOP:
                raise self.stop(error)
            if action is Verdict.FAIL:
                return Outcome(None, error, attempts, waited)
            self.recorder.stats.retried += 1
            self.recorder.stats.endpoint(endpoint.label).retried += 1
            if action is Verdict.WAIT:
                delay = next(delays)
                if waited + delay > self.max_wait_s:
                    raise self.stop(ServerGoneError(
                        f"{endpoint.label} kept failing for {self.max_wait_s:.0f} s (--max-wait): {error}; every "
                        "finished request is saved: run the same command again once the server is healthy"
                    ))  # fmt: skip
                await asyncio.sleep(delay)
                waited += delay
                continue
            # RECOVER: the server went away. Blame only what was in flight when it did.
            if not isinstance(error, ServerUnreachableError):
                self.tracker.note_crash(request.custom_id, (endpoint.label, generation))
                if alone:
                    self.tracker.note_solo_crash(request.custom_id)
            started_wait = time.perf_counter()
            await endpoint.recover(error, generation)
            waited += time.perf_counter() - started_wait
            if alone and self.tracker.convicted(request.custom_id):
                times = self.tracker.solo_crashes[request.custom_id]
                return Outcome(
                    None,
                    ServerGoneError(
                        f"the server went down each time this request was sent alone ({times} times): it is the "
                        f"request that takes it down. Last: {error}",
                        status_code=error.status_code,
                    ),
                    attempts,
                    waited,
                )
