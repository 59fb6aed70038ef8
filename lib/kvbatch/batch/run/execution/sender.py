"""Sending one request until it has an outcome, acting on what the failure policy (policy.py) decides: success, a
failure for good, a hand-back for later or for another endpoint, or a stop of the whole run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvbatch import defaults
from kvbatch.batch.inputs.answers import AnswerContracts, ask_again, invalid_answer
from kvbatch.batch.inputs.requests import BatchRequest
from kvbatch.batch.run.execution.endpoint import Endpoint, EndpointOut
from kvbatch.batch.run.execution.guard import TruncationGuard
from kvbatch.batch.run.execution.policy import Action, Decision, FailurePolicy
from kvbatch.batch.run.execution.recorder import Recorder
from kvbatch.errors import (
    KvbatchError,
    RequestTimeoutError,
    ServerFaultError,
    ServerGoneError,
    ServerUnreachableError,
)
from kvbatch.serve.backends import ChatResult
from kvbatch.serve.supervisor import backoff_delays


@dataclass
class Outcome:
    result: ChatResult | None
    error: KvbatchError | None
    attempts: int
    waited_s: float
    slot: int | None = None
    """The slot id leased for the last attempt."""
    answer_attempts: int = 0
    """Answers asked for until one kept to the request's response_format (0: it asked for no JSON)."""


class RunStopped(Exception):
    """The run must stop (authentication, a missing model, a capped context, a server gone for too long)."""

    def __init__(self, error: KvbatchError) -> None:
        super().__init__(str(error))
        self.error = error


class RetryLater(Exception):
    """Hand the request back to the end of the feed: others go first, and show whose fault the failure was."""


class Sender:
    def __init__(
        self,
        recorder: Recorder,
        guard: TruncationGuard | None,
        *,
        policy: FailurePolicy,
        max_wait_s: float = defaults.MAX_WAIT_S,
        answer_attempts: int = defaults.ANSWER_ATTEMPTS,
    ) -> None:
        self.recorder = recorder
        self.guard = guard
        self.policy = policy
        self.max_wait_s = max_wait_s
        self.answer_attempts = max(answer_attempts, 1)
        self.contracts = AnswerContracts()
        self._asked: dict[str, tuple[int, dict[str, Any]]] = {}
        """Per request still being asked again: the answers it had and the body of its next attempt (kept when it
        is handed back to the feed, so a hand-back neither resets its budget nor its grown max_tokens)."""
        self.fatal: KvbatchError | None = None
        self.others_waiting: Callable[[], bool] = lambda: True
        """Whether other requests remain to be sent (the executor sets it from its feed): at the batch's tail a
        failing request has no others to show whose fault it is, so the server is asked with a probe of ours."""

    def stop(self, error: KvbatchError) -> RunStopped:
        self.fatal = self.fatal or error
        return RunStopped(self.fatal)

    def _outcome(self, request: BatchRequest, result: ChatResult | None, error: KvbatchError | None, attempts: int,
                 waited: float, slot: int | None, answers: int) -> Outcome:  # fmt: skip
        self._asked.pop(request.custom_id, None)
        return Outcome(result, error, attempts, waited, slot, answers)

    def _note(self, endpoint: Endpoint, request: BatchRequest, error: KvbatchError, decision: Decision) -> None:
        self.recorder.event("failure", **decision.event(endpoint.label, request.custom_id, error))

    def _solo(self, endpoint: Endpoint, request: BatchRequest, generation: int, outcome: str, **details) -> None:
        """What one solo turn showed (the run report lists them: why a request was convicted, or cleared)."""
        self.recorder.event("solo_attempt", endpoint=endpoint.label, custom_id=request.custom_id,
                            server_generation=generation, outcome=outcome,
                            **{k: v for k, v in details.items() if v is not None})  # fmt: skip

    async def send(self, endpoint: Endpoint, request: BatchRequest, body: dict[str, Any], slot: int | None) -> Outcome:
        """Send until there is an outcome. Raises EndpointOut or RetryLater (hand the request back), or RunStopped.
        An answer that breaks the request's response_format is asked again (its own budget, nothing charged)."""
        waited = 0.0
        delays = backoff_delays()
        policy = self.policy
        contract = self.contracts.of(body)
        answers, body = self._asked.get(request.custom_id, (0, body))
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
            alone = policy.is_suspect(request.custom_id)
            result: ChatResult | None = None
            error: KvbatchError | None = None
            async with endpoint.capacity.exclusive(slot) if alone else endpoint.capacity.slot(slot) as leased:
                if not endpoint.accepts(generation):
                    continue  # the server is held, recovered or taken out since this request waited for the gate
                sent_mark = policy.success_mark(endpoint.label)
                try:
                    if alone and not await endpoint.backend.health():  # down already: a solo turn proves nothing
                        raise ServerUnreachableError(f"{endpoint.label} was down before a solo turn was sent")
                    result = await endpoint.backend.chat(body, slot=leased)  # the backend holds --request-timeout
                except KvbatchError as exc:
                    error = exc
                    if policy.may_be_down(exc):
                        endpoint.hold(generation)  # before the gate lets the next one in: not into the same outage
            if result is not None:
                total = policy.failed_attempts(request.custom_id) + 1  # earlier sends of it included
                truncated = self.guard.check(request, result) if self.guard else None
                problem = contract.check(result.text, result.finish_reason) if contract and not truncated else None
                if problem is not None:  # the server served: its breaker counts it; the request's record stays
                    policy.breaker(endpoint.label).success()
                else:
                    policy.succeeded(endpoint.label, request.custom_id)
                if alone:
                    self._solo(endpoint, request, generation, "served")
                if truncated is not None:
                    return self._outcome(request, None, truncated, total, waited, leased, answers)
                answers += contract is not None
                if problem is None:
                    return self._outcome(request, result, None, total, waited, leased, answers)
                self.recorder.invalid_answer(problem, result, endpoint.label)
                supervisor = endpoint.supervisor
                room = supervisor.layout.slot_context_tokens if supervisor.holds_layout_context else None
                again = ask_again(body, answers, problem, prompt_tokens=result.prompt_tokens, slot_context_tokens=room)
                if answers >= self.answer_attempts or again is None:
                    policy.finished(request.custom_id)
                    error = invalid_answer(problem, result.text, result.finish_reason, answers,
                                           no_room=again is None)  # fmt: skip
                    return self._outcome(request, None, error, total, waited, leased, answers)
                body = again
                self._asked[request.custom_id] = (answers, body)
                continue
            assert error is not None
            alone_at_the_tail = isinstance(error, (ServerFaultError, RequestTimeoutError)) and (
                endpoint.capacity.in_flight == 0 and not self.others_waiting()
                and policy.success_mark(endpoint.label) == sent_mark
            )  # fmt: skip
            answered = alone_at_the_tail and await endpoint.probe_chat()
            decision = policy.decide(endpoint.label, request.custom_id, error, sent_mark=sent_mark,
                                     probe_answered=answered)  # fmt: skip
            if decision.action is not Action.RECOVER and policy.may_be_down(error):
                endpoint.release_hold(generation)  # no recovery will look: the hold must not outlive this attempt
            if decision.action is Action.RECOVER:
                started_wait = time.perf_counter()
                recovery = await endpoint.recover(error, generation)  # whichever worker saw the failure first
                waited += time.perf_counter() - started_wait
                found_down = recovery.found_down if recovery is not None else None
                decision = policy.after_recovery(endpoint.label, request.custom_id, error, found_down=found_down,
                                                 crash=(endpoint.label, generation), alone=alone,
                                                 sent_mark=sent_mark)  # fmt: skip
            self._note(endpoint, request, error, decision)
            if alone:
                self._solo(endpoint, request, generation, decision.action.value, reason=decision.reason,
                           error=type(error).__name__, solo_crashes=decision.evidence.get("solo_crashes"))  # fmt: skip
            if decision.action is Action.STOP:
                raise self.stop(error)
            if decision.action is Action.FAIL:
                total = policy.failed_attempts(request.custom_id)
                policy.finished(request.custom_id)
                return self._outcome(request, None, decision.error or error, total, waited, None, answers)
            self.recorder.stats.retried += 1
            self.recorder.stats.endpoint(endpoint.label).retried += 1
            if decision.action is Action.BREAK:
                endpoint.trip(ServerGoneError(decision.reason), generation)
                raise EndpointOut
            if decision.action is Action.RETRY_LATER:
                await asyncio.sleep(min(next(delays), defaults.RETRY_LATER_PAUSE_S))  # no tight loop at the tail
                raise RetryLater
            if decision.action is Action.WAIT and not decision.evidence.get("recovered"):
                delay = next(delays)
                if waited + delay > self.max_wait_s:
                    raise self.stop(ServerGoneError(
                        f"{endpoint.label} kept failing for {self.max_wait_s:.0f} s (--max-wait): {error}; every "
                        "finished request is saved: run the same command again once the server is healthy"
                    ))  # fmt: skip
                await asyncio.sleep(delay)
                waited += delay
