"""Sustained load: validate a plan by running requests of the batch's own sizes at its slots and per-slot context,
comparing memory with the budget every interval.

A load is sustained by what it served, not by how long it ran: it goes on until every slot has served at least
its own context's worth of tokens over at least `SUSTAINED_MIN_REQUESTS_PER_SLOT` requests (so each slot reused
its prefix cache and made its checkpoints) *and* the set duration is over, whichever is later. A slow machine
therefore runs longer instead of passing on nothing; a ceiling bounds it, and a load stopped by the ceiling before
every slot was filled says so and does not pass. The first request error or sample above the budget ends it at
once (the verdict is known).

It fails on any request error, on memory above the budget, on a peak above the plan's memory (the plan is a
bound: what it prices must cover what the server really takes), on a drift above max(1 %, 64 MiB) over the second
half (allocator noise is a few MiB; a leak or unbounded context checkpoints grow by hundreds), and when it never
filled its slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbatch import defaults
from kvbatch.errors import KvbatchError
from kvbatch.serve.backends import Backend
from kvbatch.serve.probes import MemoryProbe


@dataclass
class SlotServed:
    """What one slot served during the load: the requests it finished and the tokens they held in it."""

    requests: int = 0
    tokens: int = 0

    def filled(self, context_tokens: int, min_requests: int) -> bool:
        return self.requests >= min_requests and self.tokens >= context_tokens


@dataclass
class SustainedResult:
    duration_s: float
    requests: int
    errors: list[str]
    slots: int
    interval_s: float
    requests_per_interval: list[int]
    memory_series: list[tuple[float, int]]
    memory_peak_bytes: int | None
    memory_drift_bytes: float | None
    budget_bytes: int | None
    passed: bool
    reasons: list[str] = field(default_factory=list)
    prompt_tokens_per_s: float | None = None
    answer_tokens_per_s: float | None = None
    slot_context_tokens: int | None = None
    served: list[SlotServed] = field(default_factory=list)
    ceiling_s: float | None = None
    stopped_by: str = ""
    """Why the load ended, in words: filled and past its duration, a request error, the budget, or the ceiling."""
    planned_bytes: int | None = None
    """The plan's memory for this layout at its peak, which the load's peak must not pass."""

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def drift_over_second_half(series: list[tuple[float, int]]) -> float | None:
    """Memory at the end minus memory at the start of the second half (each the mean of a few samples)."""
    half = series[len(series) // 2 :]
    if len(half) < 4:
        return None
    edge = max(len(half) // 5, 1)
    return float(np.mean([m for _, m in half[-edge:]]) - np.mean([m for _, m in half[:edge]]))


def allowed_drift(reference_bytes: float) -> float:
    return max(defaults.SUSTAINED_DRIFT_SHARE * reference_bytes, defaults.SUSTAINED_DRIFT_BYTES)


def served_tokens(prompt_tokens: int | None, completion_tokens: int | None, body: dict[str, Any]) -> int:
    """Tokens one request held in its slot: the server's own counts (a reply without them counts its answer cap)."""
    answer = completion_tokens if completion_tokens is not None else body.get("max_tokens") or 0
    return int(prompt_tokens or 0) + int(answer)


class _Load:
    """The shared state of one sustained load: what each slot served, and whether (and why) it must stop."""

    def __init__(self, slots: int, slot_context_tokens: int, duration_s: float, ceiling_s: float,
                 min_requests: int) -> None:  # fmt: skip
        self.started = time.perf_counter()
        self.served = [SlotServed() for _ in range(slots)]
        self.slot_context_tokens = slot_context_tokens
        self.duration_s = duration_s
        self.ceiling_s = ceiling_s
        self.min_requests = min_requests
        self.stopped_by = ""
        self.done = asyncio.Event()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stop(self, why: str) -> None:
        if not self.done.is_set():
            self.stopped_by = why
            self.done.set()

    def all_filled(self) -> bool:
        return all(s.filled(self.slot_context_tokens, self.min_requests) for s in self.served)

    def check(self) -> None:
        """End the load once it is both long enough and full enough, or at the ceiling."""
        elapsed = self.elapsed()
        if self.all_filled() and elapsed >= self.duration_s:
            self.stop(f"every slot served its context ({self.slot_context_tokens:,} tokens) at least once, "
                      f"and {self.duration_s:.0f} s passed")  # fmt: skip
        elif elapsed >= self.ceiling_s:
            self.stop(f"the ceiling of {self.ceiling_s:.0f} s")


async def sustained_load(
    backend: Backend,
    probe: MemoryProbe | None,
    bodies: Iterable[dict[str, Any]],
    *,
    slots: int,
    slot_context_tokens: int,
    duration_s: float,
    ceiling_s: float = defaults.SUSTAINED_CEILING_S,
    interval_s: float = defaults.SUSTAINED_INTERVAL_S,
    budget_bytes: int | None = None,
    planned_bytes: float | None = None,
    sample_s: float = 1.0,
    min_requests_per_slot: int = defaults.SUSTAINED_MIN_REQUESTS_PER_SLOT,
) -> SustainedResult:
    """One worker per slot (each pinned to its slot) sends the next body until the load is sustained (see the
    module's docstring), an error or the budget ends it, or the ceiling does."""
    ceiling_s = max(ceiling_s, duration_s)
    load = _Load(slots, slot_context_tokens, duration_s, ceiling_s, min_requests_per_slot)
    finished: list[float] = []
    errors: list[str] = []
    speeds: list[tuple[float, float]] = []
    series: list[tuple[float, int]] = []
    over_budget: list[tuple[float, int]] = []
    feed = itertools.cycle(list(bodies))

    async def worker(slot: int) -> None:
        while not load.done.is_set():
            body = next(feed)
            try:
                reply = await backend.chat(body, slot=slot, timeout_s=max(ceiling_s - load.elapsed(), 1) + 300)
            except KvbatchError as exc:
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                load.stop("a request error")
                return
            finished.append(load.elapsed())
            load.served[slot].requests += 1
            load.served[slot].tokens += served_tokens(reply.prompt_tokens, reply.completion_tokens, body)
            timings = reply.timings
            if timings.get("prompt_per_second") and timings.get("predicted_per_second"):
                speeds.append((float(timings["prompt_per_second"]), float(timings["predicted_per_second"])))
            load.check()

    async def sampler() -> None:
        while not load.done.is_set():
            if probe is not None:
                used = await probe.aread()
                moment = load.elapsed()
                series.append((moment, used))
                if budget_bytes and used > budget_bytes:
                    over_budget.append((moment, used))
                    load.stop("memory above the budget")
                    return
            load.check()  # the duration or the ceiling may pass while every worker waits on a long request
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(load.done.wait(), sample_s)

    tasks = [asyncio.ensure_future(sampler()), *(asyncio.ensure_future(worker(s)) for s in range(slots))]
    await load.done.wait()
    for task in tasks:  # requests still in flight at the end are not waited for: the verdict is known
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if probe is not None and not over_budget:  # what the last requests left, whenever the sampler last looked
        moment, used = load.elapsed(), await probe.aread()
        series.append((moment, used))
        if budget_bytes and used > budget_bytes:
            over_budget.append((moment, used))
    elapsed = load.elapsed()
    outcome = _verdict(load, elapsed, finished, errors, speeds, series, over_budget, budget_bytes, slots, interval_s)
    return judge_against_plan(outcome, planned_bytes) if planned_bytes else outcome


def judge_fit(outcome: SustainedResult, on_gpu_share: float | None) -> SustainedResult:
    """The outcome with where the model was as a bound: a layout Ollama split between the card and the CPU
    (0 < size_vram / size < 1) does not fit, whatever memory figure stayed under the budget."""
    if on_gpu_share is None or not 0 < on_gpu_share < 1:
        return outcome
    reason = (f"does not fit: Ollama put {on_gpu_share:.0%} of the model on the GPU at this layout (size_vram < size), "
              "the rest on the CPU")  # fmt: skip
    return dataclasses.replace(outcome, passed=False, reasons=[*outcome.reasons, reason])


def judge_against_plan(outcome: SustainedResult, planned_bytes: float) -> SustainedResult:
    """The outcome with the plan's memory as a bound: a peak above it fails the load (the plan did not price
    something the server takes while serving)."""
    peak = outcome.memory_peak_bytes
    reasons = list(outcome.reasons)
    if peak and peak > planned_bytes:
        reasons.append(f"memory peaked at {peak / 2**20:.1f} MiB, above the plan's {planned_bytes / 2**20:.1f} MiB: "
                       "the plan does not bound what the server takes")  # fmt: skip
    return dataclasses.replace(outcome, planned_bytes=int(planned_bytes), reasons=reasons,
                               passed=outcome.passed and not (peak and peak > planned_bytes))  # fmt: skip


def _verdict(load: _Load, elapsed: float, finished: list[float], errors: list[str], speeds, series, over_budget,
             budget_bytes: int | None, slots: int, interval_s: float) -> SustainedResult:  # fmt: skip
    intervals = max(int(elapsed // interval_s), 1)
    per_interval = [sum(1 for t in finished if i * interval_s <= t < (i + 1) * interval_s) for i in range(intervals)]
    reasons: list[str] = []
    if errors:
        reasons.append(f"{len(errors)} request error(s), first: {errors[0]}")
    if over_budget:
        moment, used = over_budget[0]
        reasons.append(
            f"memory {used / 2**20:.0f} MiB above the budget {budget_bytes / 2**20:.0f} MiB at {moment:.0f} s"
        )
    drift = drift_over_second_half(series)
    peak = max((m for _, m in series), default=None)
    if drift is not None and peak and drift > allowed_drift(peak):
        reasons.append(
            f"memory grew {drift / 2**20:+.0f} MiB over the second half "
            f"(allowed: {allowed_drift(peak) / 2**20:.0f} MiB)"
        )
    if not finished:
        reasons.append("no request finished")
    if not errors and not over_budget and not load.all_filled():
        context, least = load.slot_context_tokens, load.min_requests
        short = [f"slot {i}: {s.requests} request(s), {s.tokens:,} of {context:,} tokens"
                 for i, s in enumerate(load.served) if not s.filled(context, least)]  # fmt: skip
        reasons.append(
            f"stopped by {load.stopped_by} before every slot had served its context once ("
            + "; ".join(short)
            + "): nothing was sustained; raise the ceiling or use a faster machine"
        )
    return SustainedResult(
        elapsed, len(finished), errors, slots, interval_s, per_interval, series, peak, drift, budget_bytes,
        not reasons, reasons,
        float(np.median([p for p, _ in speeds])) if speeds else None,
        float(np.median([a for _, a in speeds])) if speeds else None,
        load.slot_context_tokens, load.served, load.ceiling_s, load.stopped_by,
    )  # fmt: skip
