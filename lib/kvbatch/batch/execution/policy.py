"""What to do about each failure, in one place.

- Authentication, a missing model, a server that will not give the planned context: stop the run at once and
  record nothing as failed (a missing key must not burn the input).
- The request itself is refused (400/422, too long, truncated): it fails for good, alone, on its first attempt.
- Transient (429/503, a reply that is not JSON): wait with capped, jittered back-off, spending none of the
  request's attempts, for up to `--max-wait`; past that the run stops (everything done is saved), because
  waiting longer, not failing the request, is what would serve it.
- The server went away (a crash, a kill, an out-of-memory, a timeout): recover it, and charge an attempt only to
  the suspect. Requests in flight during a crash are noted; one noted a second time is run alone; a request
  that takes the server down alone is charged, and fails for good after `max_attempts` such crashes.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from kvbatch import defaults
from kvbatch.errors import (
    AuthError,
    BadRequestError,
    KvbatchError,
    NotFoundError,
    ServerGoneError,
    ServerLimitError,
    TransientError,
)


class Verdict(enum.Enum):
    FAIL = "fail"
    WAIT = "wait"
    RECOVER = "recover"
    STOP = "stop"


def verdict(error: KvbatchError) -> Verdict:
    if isinstance(error, (AuthError, NotFoundError, ServerLimitError)):
        return Verdict.STOP
    if isinstance(error, BadRequestError):
        return Verdict.FAIL
    if isinstance(error, ServerGoneError):
        return Verdict.RECOVER
    if isinstance(error, TransientError):
        return Verdict.WAIT
    return Verdict.FAIL


@dataclass
class SuspectTracker:
    """Which requests were in flight when a server went down, and which took it down alone."""

    max_attempts: int = defaults.MAX_ATTEMPTS
    crashes: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    """Per request, the crashes (endpoint, generation) it was in flight for."""
    solo_crashes: Counter = field(default_factory=Counter)

    def note_crash(self, custom_id: str, crash: tuple[str, int]) -> None:
        self.crashes.setdefault(custom_id, set()).add(crash)

    def is_suspect(self, custom_id: str) -> bool:
        """In flight during two crashes: from now on it runs alone."""
        return len(self.crashes.get(custom_id, ())) >= 2

    def note_solo_crash(self, custom_id: str) -> int:
        """It took the server down alone: charge it an attempt; returns its charged attempts."""
        self.solo_crashes[custom_id] += 1
        return self.solo_crashes[custom_id]

    def convicted(self, custom_id: str) -> bool:
        return self.solo_crashes[custom_id] >= self.max_attempts

    def cleared(self, custom_id: str) -> None:
        self.crashes.pop(custom_id, None)
        self.solo_crashes.pop(custom_id, None)
