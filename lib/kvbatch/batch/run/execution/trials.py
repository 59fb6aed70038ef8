"""`--concurrency auto`: try a few in-flight counts on real requests of the batch (their results are kept) and keep
the fastest. Rates are compared once every slot is warm: cold first requests would favour whichever ran longest."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvbatch import defaults
from kvbatch.batch.run.execution.feed import Feed
from kvbatch.batch.run.execution.recorder import Recorder

Phase = Callable[[int, int | None], Awaitable[tuple[int, float]]]
"""Run up to `limit` requests with `in_flight` workers; return (requests done once warm, seconds since warm)."""


@dataclass
class ConcurrencyTrials:
    ladder: tuple[int, ...] = defaults.CONCURRENCY_LADDER
    requests_per_slot: int = defaults.TRIAL_REQUESTS_PER_SLOT
    improvement: float = defaults.CONCURRENCY_IMPROVEMENT

    async def choose(self, phase: Phase, feed: Feed, *, slots: int, total: int | None, recorder: Recorder) -> int:
        """Climb the ladder four steps at a time (1, 4, 16, 64, 256, and the plan's own slot count) while the rate
        rises by 5 %; where it stops rising, try the count halfway back. Each trial's requests are real work (their
        results are kept), so a short climb costs little even on a server that runs hundreds at once."""
        ladder = sorted({c for c in self.ladder if c <= max(slots, 1)} | {max(slots, 1)})
        if slots >= defaults.UNKNOWN_SERVER_SLOTS:  # it did not say its slots: it batches (vLLM, SGLang), and
            ladder = [c for c in ladder if c >= defaults.UNKNOWN_SERVER_FIRST_TRIAL]  # 1 in flight only costs time
        ladder = [c for c in ladder if c <= max(total or 1, 1)] or [1]
        if len(ladder) == 1:
            return ladder[0]
        rates: dict[int, float] = {}

        async def trial(count: int) -> tuple[float, bool]:
            """The rate once every slot was warm, and whether the batch ended before the trial's quota."""
            limit = count * self.requests_per_slot  # once every slot is warm
            done, seconds = await phase(count, limit)
            rate = done / seconds if seconds else 0.0
            rates[count] = rate
            recorder.stats.trials.append({"in_flight": count, "requests": done, "seconds": round(seconds, 3),
                                          "requests_per_s": round(rate, 4)})  # fmt: skip
            recorder.event("concurrency_trial", in_flight=count, requests=done, requests_per_s=round(rate, 4))
            return rate, feed.drained and done < limit

        best, index = ladder[0], 0
        rate, ended = await trial(best)
        if ended:
            return self._chosen(best, recorder, ended_during=best)
        while index < len(ladder) - 1:
            step = min(index + 2, len(ladder) - 1)  # two rungs of the doubling ladder: four times as many
            rate, ended = await trial(ladder[step])
            if ended:  # what it measured still counts: the faster of the two is the one reported
                faster = ladder[step] if rate > rates[best] else best
                return self._chosen(faster, recorder, ended_during=ladder[step])
            if rate <= rates[best] * self.improvement:
                between = ladder[index + 1] if step == index + 2 else None
                if between is not None and between not in rates:
                    middle, ended = await trial(between)
                    if middle > rates[best] * self.improvement or (ended and middle > rates[best]):
                        best = between
                    if ended:
                        return self._chosen(best, recorder, ended_during=between)
                break
            best, index = ladder[step], step
        return self._chosen(best, recorder)

    def _chosen(self, best: int, recorder: Recorder, *, ended_during: int | None = None) -> int:
        """The count kept, and why: the trials' own verdict, or the batch ending during a trial (then the faster
        count measured is kept, so the line never names a slower one)."""
        why = (f"the batch ended during the trial at {ended_during} in flight: the faster count measured is kept"
               if ended_during is not None else "the fastest count tried (a count must beat the best by 5 %)")
        recorder.event("concurrency_chosen", in_flight=best, why=why)
        return best
