"""`--concurrency auto`: try a few in-flight counts on real requests of the batch (their results are kept) and keep
the fastest. Rates are compared once every slot is warm: cold first requests would favour whichever ran longest."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvbatch import defaults
from kvbatch.batch.execution.gate import Feed
from kvbatch.batch.execution.recorder import Recorder

Phase = Callable[[int, int | None], Awaitable[tuple[int, float]]]
"""Run up to `limit` requests with `in_flight` workers; return (requests done once warm, seconds since warm)."""


@dataclass
class ConcurrencyTrials:
    ladder: tuple[int, ...] = defaults.CONCURRENCY_LADDER
    requests_per_slot: int = defaults.TRIAL_REQUESTS_PER_SLOT
    improvement: float = 1.05
    """A count must beat the best so far by 5 % to be kept: on 2 CPU cores the trials stop after trying 2."""

    async def choose(self, phase: Phase, feed: Feed, *, slots: int, total: int | None, recorder: Recorder) -> int:
        candidates = [c for c in self.ladder if c <= max(slots, 1) and c <= max(total or 1, 1)] or [1]
        if len(candidates) == 1:
            return candidates[0]
        best, best_rate = 1, 0.0
        for count in candidates:
            trial = count * (self.requests_per_slot + 1)
            done, seconds = await phase(count, trial)
            rate = done / seconds if seconds else 0.0
            recorder.stats.trials.append({"in_flight": count, "requests": done, "seconds": round(seconds, 3),
                                          "requests_per_s": round(rate, 4)})  # fmt: skip
            recorder.event("concurrency_trial", in_flight=count, requests=done, requests_per_s=round(rate, 4))
            if feed.drained and done < trial:
                break
            if rate <= best_rate * self.improvement:
                break
            best, best_rate = count, rate
        recorder.event("concurrency_chosen", in_flight=best)
        return best
