"""Sustained load: validate a plan by running requests of the batch's own sizes at its slots and per-slot context
for a set time, comparing memory with the budget every interval.

It fails on any request error, on memory above the budget, and on a drift above max(1 %, 64 MiB) over the second
half (allocator noise is a few MiB; a leak or unbounded context checkpoints grow by hundreds).
"""

from __future__ import annotations

import asyncio
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


async def sustained_load(
    backend: Backend,
    probe: MemoryProbe | None,
    bodies: Iterable[dict[str, Any]],
    *,
    slots: int,
    duration_s: float,
    interval_s: float = defaults.SUSTAINED_INTERVAL_S,
    budget_bytes: int | None = None,
    sample_s: float = 1.0,
) -> SustainedResult:
    """One worker per slot (each pinned to its slot) sends the next body until `duration_s` is over."""
    started = time.perf_counter()
    stop = started + duration_s
    finished: list[float] = []
    errors: list[str] = []
    speeds: list[tuple[float, float]] = []
    series: list[tuple[float, int]] = []
    over_budget: list[tuple[float, int]] = []
    feed = itertools.cycle(list(bodies))

    async def worker(slot: int) -> None:
        while time.perf_counter() < stop:
            try:
                reply = await backend.chat(next(feed), slot=slot, timeout_s=max(stop - time.perf_counter(), 1) + 300)
                finished.append(time.perf_counter() - started)
                timings = reply.timings
                if timings.get("prompt_per_second") and timings.get("predicted_per_second"):
                    speeds.append((float(timings["prompt_per_second"]), float(timings["predicted_per_second"])))
            except KvbatchError as exc:
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                return

    async def sampler() -> None:
        while time.perf_counter() < stop and probe is not None:
            used = await probe.aread()
            moment = time.perf_counter() - started
            series.append((moment, used))
            if budget_bytes and used > budget_bytes:
                over_budget.append((moment, used))
            await asyncio.sleep(sample_s)

    await asyncio.gather(sampler(), *(worker(slot) for slot in range(slots)))
    elapsed = time.perf_counter() - started
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
    return SustainedResult(
        elapsed, len(finished), errors, slots, interval_s, per_interval, series, peak, drift, budget_bytes,
        not reasons, reasons,
        float(np.median([p for p, _ in speeds])) if speeds else None,
        float(np.median([a for _, a in speeds])) if speeds else None,
    )  # fmt: skip
