"""What a failed attempt means, decided in one place: `FailurePolicy.decide`, whose rules read top to bottom.

1. Authentication, a missing model, a server that will not give the planned context: stop the run at once and
   record nothing as failed (a missing key must not burn the input).
2. The request itself is refused (400/422, too long, its prompt cut): it fails for good, alone, first time.
3. Busy (429/503) or a reply that is not JSON: wait with capped, jittered back-off, nothing charged, up to
   `--max-wait`; past that the run stops with everything saved (waiting, not failing, is what would serve it).
4. Nothing listening: recover the server, nothing charged (it was down before the request was sent).
5. The server failed this attempt but is up (5xx, no reply in time, a connection dropped while it stayed
   healthy). The endpoint's breaker counts the different requests that failed since its last success:
   - `BREAKER_REQUESTS` different requests in a row with nothing served in between: the fault is the server's.
     Nothing is charged to them; the endpoint is taken out and probed with a real chat request (a wedged
     server says it is healthy), and past `--max-wait` the run stops with one sentence.
   - Otherwise, when other requests succeeded while this one failed, the request is charged an attempt and
     retried after others; at `MAX_SERVER_FAULTS` it fails for good ("timed out N times after T s"). A poison
     request still fails alone: it fails while others succeed.
   - Otherwise it is retried after others, uncharged: the breaker will tell.
6. The server went down (found down by its recovery, or out of memory): blame only what was in flight. A request
   in flight during two crashes is sent alone from then on (suspects take their solo turns one at a time, and
   nothing else is in flight meanwhile); one that takes the server down alone is charged, and fails for good after
   `--max-attempts` such crashes. A crash convicts at most one request: the one alone in flight when it happened.
   Nothing is sent while a lost connection's recovery has not looked (`Endpoint.hold`), so no request is sent
   into an outage and blamed for it.

Every decision is written to events.jsonl with the evidence it used (`Decision.event`).
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvbatch import defaults
from kvbatch.errors import (
    AuthError,
    BadRequestError,
    ConnectionDroppedError,
    KvbatchError,
    NotFoundError,
    RequestTimeoutError,
    ServerFaultError,
    ServerGoneError,
    ServerLimitError,
    ServerUnreachableError,
    TransientError,
)


class Action(enum.Enum):
    STOP = "stop the run"
    FAIL = "failed for good"
    WAIT = "wait and retry, not charged"
    RETRY_LATER = "retry after others"
    RECOVER = "recover the server"
    BREAK = "take the server out and probe it"
    ALONE = "retry alone"


@dataclass
class Decision:
    action: Action
    reason: str
    charged: bool = False
    """The attempt counted against the request (`--max-attempts`)."""
    error: KvbatchError | None = None
    """For FAIL: the error recorded in errors.jsonl (it may say more than the last attempt's own)."""
    evidence: dict[str, Any] = field(default_factory=dict)

    def event(self, endpoint: str, custom_id: str, error: KvbatchError) -> dict[str, Any]:
        return {"endpoint": endpoint, "custom_id": custom_id, "error": type(error).__name__,
                "message": str(error)[:200], "action": self.action.value, "reason": self.reason,
                "charged": self.charged, **self.evidence}  # fmt: skip


@dataclass
class Breaker:
    """One endpoint's record of failures since its last success: which different requests failed, and how."""

    successes: int = 0
    """Real requests served (a probe of ours never counts: a wedged server may answer a one-token request)."""
    attempts: int = 0
    """Failed attempts since the last success: with fewer requests left than BREAKER_REQUESTS, the same few
    failing over and over tell the same."""
    failing: set[str] = field(default_factory=set)
    kinds: Counter = field(default_factory=Counter)
    last: str = ""
    failing_since: float | None = None
    """When the failures began that no real success has ended since (monotonic): `--max-wait` counts from here,
    through any number of take-outs and re-admissions."""
    faults_total: int = 0
    """Server faults over the whole run (not reset by a success): with the successes, the server's own fault rate."""

    def fault_rate(self, excluding: int = 0) -> float:
        """The share of attempts that met a server fault, leaving out `excluding` faults (one request's own)."""
        faults = max(self.faults_total - excluding, 0)
        return faults / (faults + self.successes) if faults + self.successes else 0.0

    def success(self) -> None:
        self.successes += 1
        self.failing_since = None
        self.new_streak()

    def new_streak(self) -> None:
        """A probe was answered and the server is re-admitted: count its failures afresh (its time does not)."""
        self.attempts = 0
        self.failing.clear()
        self.kinds.clear()
        self.last = ""

    def fault(self, custom_id: str, error: KvbatchError) -> int:
        self.attempts += 1
        self.faults_total += 1
        self.failing.add(custom_id)
        self.kinds[type(error).__name__] += 1
        self.last = str(error)[:200]
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        return len(self.failing)

    def describe(self) -> str:
        kinds = ", ".join(f"{_KIND_WORDS.get(kind, kind)} x{count}" for kind, count in self.kinds.most_common())
        return (f"{len(self.failing)} different request(s) failed {self.attempts} times in a row with nothing served "
                f"in between ({kinds}); last: {self.last}")  # fmt: skip


_KIND_WORDS = {
    "ServerFaultError": "server errors",
    "RequestTimeoutError": "timeouts",
    "ConnectionDroppedError": "dropped connections",
}


@dataclass
class RequestFaults:
    """What one request has been through: its charged attempts, and the crashes it was in flight for."""

    charged: int = 0
    failed_attempts: int = 0
    previous_failure: tuple[str, int] | None = None
    """The endpoint and its success count at this request's previous failure: more successes there since then
    mean others succeeded while it kept failing."""
    crashes: set[tuple[str, int]] = field(default_factory=set)
    solo_crashes: int = 0


class FailurePolicy:
    """The one owner of what a failed attempt means (see the module's rules). The sender asks it, and acts."""

    def __init__(self, max_attempts: int = defaults.MAX_ATTEMPTS, max_faults: int = defaults.MAX_SERVER_FAULTS,
                 breaker_requests: int = defaults.BREAKER_REQUESTS) -> None:  # fmt: skip
        self.max_attempts = max_attempts
        self.max_faults = max_faults
        self.breaker_requests = breaker_requests
        self.breakers: dict[str, Breaker] = {}
        self.requests: dict[str, RequestFaults] = {}
        self.convicting: dict[tuple[str, int], str] = {}
        """Each crash's one solo runner: a crash is evidence against at most one request, the one alone in flight
        when the server went down; a request that met the same outage after it is not."""

    def breaker(self, endpoint: str) -> Breaker:
        breaker = self.breakers.get(endpoint)
        return breaker if breaker is not None else self.breakers.setdefault(endpoint, Breaker())

    def _faults(self, custom_id: str) -> RequestFaults:
        return self.requests.setdefault(custom_id, RequestFaults())

    def success_mark(self, endpoint: str) -> int:
        """Taken when an attempt is sent: a success on the endpoint after it means others succeeded meanwhile."""
        return self.breaker(endpoint).successes

    def succeeded(self, endpoint: str, custom_id: str) -> None:
        self.breaker(endpoint).success()
        self.requests.pop(custom_id, None)

    def finished(self, custom_id: str) -> None:
        self.requests.pop(custom_id, None)

    def failed_attempts(self, custom_id: str) -> int:
        faults = self.requests.get(custom_id)
        return faults.failed_attempts if faults else 0

    def probe_served(self, endpoint: str) -> None:
        """A server taken out answered its probe and is re-admitted: its failures are counted afresh. Not a success:
        a server that answers a one-token probe may still fail every real request."""
        self.breaker(endpoint).new_streak()

    @staticmethod
    def may_be_down(error: KvbatchError) -> bool:
        """A lost connection or nothing listening: the server may be down, and its recovery decides (rules 4, 6)."""
        return isinstance(error, ServerGoneError)

    def is_suspect(self, custom_id: str) -> bool:
        """In flight during two crashes: from now on it runs alone."""
        faults = self.requests.get(custom_id)
        return bool(faults and len(faults.crashes) >= 2)

    def decide(self, endpoint: str, custom_id: str, error: KvbatchError, *, sent_mark: int,
               probe_answered: bool = False) -> Decision:  # fmt: skip
        """Rules 1-5 (see the module's docstring); rule 6 comes after the recovery (`after_recovery`).
        `probe_answered`: nothing else was left to send, and the server answered a request of ours meanwhile."""
        self._faults(custom_id).failed_attempts += 1
        if isinstance(error, (AuthError, NotFoundError, ServerLimitError)):
            return Decision(Action.STOP, "no request can succeed until this is fixed")
        if isinstance(error, BadRequestError):
            return Decision(Action.FAIL, "the server refused the request itself", charged=True, error=error)
        if isinstance(error, ServerUnreachableError):
            return Decision(Action.RECOVER, "nothing listening: the server was down before the request was sent")
        if isinstance(error, (ServerFaultError, RequestTimeoutError)):
            return self.server_fault(endpoint, custom_id, error, sent_mark=sent_mark, probe_answered=probe_answered)
        if isinstance(error, ServerGoneError):  # dropped connections and out of memory: is the server still up?
            return Decision(Action.RECOVER, "the server may have gone down: its recovery will tell")
        if isinstance(error, TransientError):
            return Decision(Action.WAIT, "busy, or a reply that is not JSON: waiting will serve it")
        return Decision(Action.FAIL, "an error no rule covers", charged=True, error=error)

    def server_fault(self, endpoint: str, custom_id: str, error: KvbatchError, *, sent_mark: int,
                     probe_answered: bool = False) -> Decision:  # fmt: skip
        """Rule 5: the server is up and failed this attempt. Whose fault is it?"""
        breaker = self.breaker(endpoint)
        failing = breaker.fault(custom_id, error)
        faults = self._faults(custom_id)
        evidence = {"different_requests_failing": failing, "successes_since_sent": breaker.successes - sent_mark}
        if failing >= self.breaker_requests or breaker.attempts >= defaults.BREAKER_ATTEMPTS:
            return Decision(Action.BREAK, f"the server's fault: {breaker.describe()}", evidence=evidence)
        previous = faults.previous_failure
        reference = previous[1] if previous is not None and previous[0] == endpoint else sent_mark
        faults.previous_failure = (endpoint, breaker.successes)
        if breaker.successes > reference or probe_answered:  # others were served while this one kept failing
            faults.charged += 1
            # by chance, on a server that fails this share of everyone's attempts (floored at 1 %)?
            rate = max(breaker.fault_rate(excluding=faults.failed_attempts), defaults.AMBIENT_FAULT_RATE_FLOOR)
            evidence["server_fault_rate"] = round(rate, 4)
            if faults.charged >= self.max_faults and rate**faults.charged <= defaults.BY_CHANCE_ODDS:
                return Decision(Action.FAIL, "it failed while the server answered others", charged=True,
                                error=self._failed_for_good(error, faults.charged), evidence=evidence)  # fmt: skip
            return Decision(Action.RETRY_LATER, "it failed while the server answered others", charged=True,
                            evidence=evidence)  # fmt: skip
        return Decision(Action.RETRY_LATER, "nothing else was served meanwhile: not charged, the breaker will tell",
                        evidence=evidence)  # fmt: skip

    def after_recovery(self, endpoint: str, custom_id: str, error: KvbatchError, *, found_down: bool | None,
                       crash: tuple[str, int], alone: bool, sent_mark: int) -> Decision:  # fmt: skip
        """Rules 4 and 6, once the server's recovery has said whether it was down. The request is retried at once
        (`recovered` in the evidence: the recovery itself was the wait)."""
        if isinstance(error, ServerUnreachableError):
            return Decision(Action.WAIT, "nothing was listening: the server was down before the request was sent",
                            evidence={"recovered": True, "found_down": found_down})  # fmt: skip
        if found_down is None:  # recovered (or taken out) by another worker's failure: nothing known to blame
            return Decision(Action.WAIT, "the server was recovered meanwhile: not charged",
                            evidence={"recovered": True})  # fmt: skip
        if not found_down:  # it stayed up: a dropped connection (or an allocation that failed) is not a crash
            return self.server_fault(endpoint, custom_id, error, sent_mark=sent_mark)
        faults = self._faults(custom_id)
        if alone and self.convicting.setdefault(crash, custom_id) != custom_id:
            return Decision(Action.ALONE, "it met the server still down after another request's solo crash: not "
                            "evidence against it", evidence={"found_down": found_down, "recovered": True,
                                                            "solo_crash_of": self.convicting[crash]})  # fmt: skip
        faults.crashes.add(crash)
        evidence = {"crashes_in_flight": len(faults.crashes), "found_down": found_down, "recovered": True}
        if not alone:
            if len(faults.crashes) >= 2:
                return Decision(Action.ALONE, "in flight during two crashes: sent alone from now on",
                                evidence=evidence)  # fmt: skip
            return Decision(Action.WAIT, "in flight during a crash: not charged", evidence=evidence)
        faults.solo_crashes += 1
        faults.charged += 1
        evidence["solo_crashes"] = faults.solo_crashes
        if faults.solo_crashes >= self.max_attempts:
            gone = ServerGoneError(
                f"the server went down each time this request was sent alone ({faults.solo_crashes} times): it is "
                f"the request that takes it down. Last: {error}",
                status_code=error.status_code,
            )
            return Decision(Action.FAIL, "it takes the server down alone", charged=True, error=gone,
                            evidence=evidence)  # fmt: skip
        return Decision(Action.ALONE, "the server went down while it ran alone", charged=True, evidence=evidence)

    def _failed_for_good(self, error: KvbatchError, times: int) -> KvbatchError:
        if isinstance(error, RequestTimeoutError):
            limit = error.details.get("timeout_s")
            after = f" after {limit:g} s" if isinstance(limit, (int, float)) else ""
            text = f"timed out {times} times{after} while the server answered other requests: {error}"
            return RequestTimeoutError(text, details=error.details)
        what = "dropped the connection" if isinstance(error, ConnectionDroppedError) else "failed"
        return type(error)(f"the server {what} {times} times for this request while it answered others: {error}",
                           status_code=error.status_code)  # fmt: skip
