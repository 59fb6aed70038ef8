"""The experiments: memory vs allocated context (sweep A), memory vs tokens in use (sweep B), the regression and
what it flags, and the safe-context search under a real memory budget.

Each experiment loads the model through a `Loader` (measure/loaders.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import stats

from kvbatch import defaults
from kvbatch.errors import FillError, KvbatchError, OutOfMemoryError, ServerStartError
from kvbatch.measure.loaders import Loader, LoadPoint

REPEAT_SPREAD_FLAG = 0.02
"""Repeats of one context that disagree by more than this share of their memory are flagged."""
SLOPE_VS_PREDICTION_FLAG = 0.10
R_SQUARED_FLAG = 0.99


class MeasurementError(KvbatchError):
    """A load failed for a reason that is not memory (a timeout, a missing model): the search cannot go on."""


# ---- sweep A and the fit ---------------------------------------------------------------------------------------
@dataclass
class LinearFit:
    """memory = base + slope x context, with the slope's 95 % confidence interval."""

    slope_bytes_per_token: float
    base_bytes: float
    r_squared: float
    slope_ci95: tuple[float, float]
    points: int
    residuals: list[float] = field(default_factory=list)

    def predict(self, context_tokens: float) -> float:
        return self.base_bytes + self.slope_bytes_per_token * context_tokens


def fit_line(contexts: list[float] | np.ndarray, used: list[float] | np.ndarray) -> LinearFit:
    x = np.asarray(contexts, dtype=float)
    y = np.asarray(used, dtype=float)
    if len(np.unique(x)) < 2:
        raise KvbatchError("a fit needs at least two different context sizes")
    result = stats.linregress(x, y)
    dof = max(len(x) - 2, 1)
    half = float(stats.t.ppf(0.975, dof) * result.stderr) if len(x) > 2 else float("nan")
    residuals = (y - (result.intercept + result.slope * x)).tolist()
    return LinearFit(
        float(result.slope),
        float(result.intercept),
        float(result.rvalue**2),
        (float(result.slope - half), float(result.slope + half)),
        len(x),
        residuals,
    )


def repeat_spread(points: list[LoadPoint]) -> float:
    """The largest (max - min) / mean over the repeats of any one context; 0 with one repeat."""
    spreads = []
    for context in {p.context_tokens for p in points}:
        values = [p.used_bytes for p in points if p.context_tokens == context]
        if len(values) > 1 and np.mean(values):
            spreads.append((max(values) - min(values)) / float(np.mean(values)))
    return max(spreads, default=0.0)


def findings(fit: LinearFit, predicted_slope: float | None, spread: float, points: list[LoadPoint]) -> list[str]:
    """What a reader must know before trusting the line, in words."""
    notes = []
    if spread > REPEAT_SPREAD_FLAG:
        notes.append(f"repeats disagree by up to {spread:.1%} (more than {REPEAT_SPREAD_FLAG:.0%}): memory is noisy")
    if fit.r_squared < R_SQUARED_FLAG:
        notes.append(f"the line explains the points poorly (R² {fit.r_squared:.4f} < {R_SQUARED_FLAG})")
    if fit.residuals:
        scale = max(float(np.median(np.abs(fit.residuals))), 1.0)
        for point, residual in zip(points, fit.residuals, strict=False):
            if abs(residual) > 5 * scale and abs(residual) > 0.01 * point.used_bytes:
                notes.append(
                    f"the load at {point.context_tokens} tokens (repeat {point.repeat}) is an outlier: "
                    f"{residual / 2**20:+.1f} MiB off the line"
                )
    if predicted_slope:
        off = fit.slope_bytes_per_token / predicted_slope - 1
        if abs(off) > SLOPE_VS_PREDICTION_FLAG:
            notes.append(
                f"the measured slope is {off:+.0%} from the architecture's prediction: the architecture model does "
                "not explain this server; the plan uses the measured slope"
            )
    return notes


def does_not_fit(exc: KvbatchError) -> str | None:
    """Why a load did not fit, when `exc` says so (a failed allocation, an out-of-memory reply or crash, a split
    between GPU and CPU); None when it says nothing about memory (a timeout, a missing model), which stops the
    measurement."""
    if isinstance(exc, ServerStartError):
        return (exc.failure_line or str(exc))[:300] if exc.out_of_memory or exc.exit_signal else None
    if isinstance(exc, OutOfMemoryError):
        return str(exc)[:300]
    return None


def not_measured_reason(exc: KvbatchError, context: int) -> str:
    """What a point that could not be measured records: it did not fit, or its fill could not be made. Any other
    failure says nothing about memory and stops the measurement (MeasurementError, its reason in one sentence)."""
    if isinstance(exc, FillError):
        return f"could not fill: {exc}"[:300]
    reason = does_not_fit(exc)
    if reason is None:
        raise MeasurementError(f"the load at {context} tokens failed, not for memory: {exc}") from exc
    return reason


def _not_fitting(context: int, repeat: int, reason: str) -> LoadPoint:
    return LoadPoint(context, repeat, 0, "", fits=False, reason=reason)


def sweep_allocated(
    loader: Loader,
    contexts: list[int],
    repeats: int = 1,
    *,
    settle_s: float = 0.3,
    on_point: Callable[[LoadPoint], None] | None = None,
) -> list[LoadPoint]:
    """Sweep A: load at each context (`repeats` times, interleaved) and read memory right after load. A context
    that does not fit is a point of its own (`fits` False, with its reason), and no larger one is loaded again."""
    points: list[LoadPoint] = []
    too_big: int | None = None
    for repeat in range(repeats):
        for context in contexts:
            if too_big is not None and context >= too_big:
                continue
            try:
                with loader.load(context) as loaded:
                    time.sleep(settle_s)
                    point = replace(loaded.memory(), repeat=repeat)
            except KvbatchError as exc:
                point = _not_fitting(context, repeat, not_measured_reason(exc, context))
                if not isinstance(exc, FillError):  # a larger context would not fit either
                    too_big = context
            points.append(point)
            if on_point:
                on_point(point)
    return points


def sweep_in_use(
    loader: Loader, context_tokens: int, fractions: list[float], *, on_point: Callable[[LoadPoint], None] | None = None
) -> list[LoadPoint]:
    """Sweep B: one load; serve requests that fill more and more of the context, reading memory after each. An
    allocation that does not fit is one point saying so; a fill that could not be made is a point saying so, and
    the sweep goes on with the next."""
    points: list[LoadPoint] = []
    try:
        with loader.load(context_tokens) as loaded:
            # The first request of at least one micro-batch (512) touches the compute buffers once (about 25 MiB
            # here); that is a one-time cost, not a per-token one, so the baseline is read after it.
            warm_tokens = min(600, context_tokens // 2)
            for fraction in [None, *fractions]:
                wanted = warm_tokens if fraction is None else max(int(context_tokens * fraction) - 16, 1)
                try:
                    used = loaded.fill(wanted, max_tokens=1 if fraction is None else 4)
                except FillError as exc:
                    point = replace(_not_fitting(context_tokens, 0, f"could not fill: {exc}"[:300]),
                                    tokens_in_use=wanted)  # fmt: skip
                else:
                    point = replace(loaded.memory(), tokens_in_use=warm_tokens if fraction is None else used or wanted)
                points.append(point)
                if on_point and fraction is not None:
                    on_point(point)
    except KvbatchError as exc:
        points.append(_not_fitting(context_tokens, 0, not_measured_reason(exc, context_tokens)))
    return points


# ---- safe-context search -----------------------------------------------------------------------------------------
@dataclass
class SearchStep:
    context_tokens: int
    fits: bool
    reason: str
    seconds: float
    error: bool = False


@dataclass
class SafeContextResult:
    """The largest context that loaded and served a request filling it, under the budget; and the margin applied."""

    max_context_tokens: int | None
    safe_context_tokens: int | None
    budget_bytes: int
    safety_margin: float
    step_tokens: int
    steps: list[SearchStep] = field(default_factory=list)

    @property
    def loads(self) -> int:
        return len(self.steps)


def safe_from_largest(largest: int, margin: float, step: int) -> int:
    """The margin, applied one way everywhere: safe = largest x margin on the step grid, always below largest."""
    return max(min(int(largest * margin) // step * step, largest - step), step)


def try_context(
    loader: Loader, context_tokens: int, budget_bytes: int, *, fill_fraction: float = 1.0, enforce_budget: bool = True
) -> SearchStep:
    """Load at `context_tokens` under the budget and serve a request filling it.

    'Too big': an allocation failure at start, an out-of-memory reply, a crash while serving, memory above the
    budget (where the OS does not enforce it), a split between GPU and CPU. Anything else (a timeout, a missing
    model, a refused request) is not a memory answer: it raises MeasurementError with its reason.
    """
    started = time.perf_counter()
    try:
        with loader.load(context_tokens, budget_bytes if enforce_budget else None) as loaded:
            if fill_fraction > 0:
                loaded.fill(max(int(context_tokens * fill_fraction) - 16, 1), max_tokens=4)
            used = loaded.memory().used_bytes
            if not enforce_budget and used > budget_bytes:
                reason = f"held {used / 2**20:.0f} MiB > budget {budget_bytes / 2**20:.0f} MiB"
                return SearchStep(context_tokens, False, reason, time.perf_counter() - started)
    except KvbatchError as exc:  # a fill that could not be made is no answer on memory: taken as too big, so the
        reason = not_measured_reason(exc, context_tokens)  # safe context stays below it
        return SearchStep(context_tokens, False, reason, time.perf_counter() - started,
                          error=isinstance(exc, FillError))  # fmt: skip
    return SearchStep(context_tokens, True, "loaded and served", time.perf_counter() - started)


def max_loads(floor_tokens: int, ceiling_tokens: int, step_tokens: int) -> int:
    """The bound the search keeps to: plain bisection's log2(range/step), +1 for the floor, +3 for the guess and
    the two gallop steps tried before it falls back to bisection."""
    return math.ceil(math.log2(max((ceiling_tokens - floor_tokens) / step_tokens, 1))) + 4


def search_safe_context(
    loader: Loader,
    budget_bytes: int,
    *,
    floor_tokens: int,
    ceiling_tokens: int,
    step_tokens: int = 256,
    guide: LinearFit | None = None,
    safety_margin: float = defaults.SAFETY_MARGIN,
    fill_fraction: float = 1.0,
    enforce_budget: bool = True,
    known: list[SearchStep] | None = None,
    on_step: Callable[[SearchStep], None] | None = None,
) -> SafeContextResult:
    """The largest context in [floor, ceiling] on a `step_tokens` grid that loads and serves under the budget.

    A guiding line (memory = base + slope x context) picks the first probe; the search gallops from there (1, 2
    steps) until the answer flips, then bisects. When the guess misses twice it falls back to plain bisection
    over what is left, so a poor line never costs more than `max_loads`.
    """
    result = SafeContextResult(None, None, budget_bytes, safety_margin, step_tokens, steps=list(known or []))
    cache: dict[int, bool] = {probe.context_tokens: probe.fits for probe in known or []}

    def fits(context: int) -> bool:
        if context not in cache:
            probe = try_context(loader, context, budget_bytes, fill_fraction=fill_fraction,
                                enforce_budget=enforce_budget)  # fmt: skip
            result.steps.append(probe)
            if on_step:
                on_step(probe)
            cache[context] = probe.fits
        return cache[context]

    def grid(tokens: float) -> int:
        return int(min(max(tokens // step_tokens * step_tokens, floor_tokens), ceiling_tokens))

    low, high = floor_tokens, ceiling_tokens + step_tokens  # invariant: low fits (once checked), high does not
    if guide is not None and guide.slope_bytes_per_token > 0:
        guess = grid((budget_bytes - guide.base_bytes) / guide.slope_bytes_per_token)
        if fits(guess):
            low = guess
            for jump in (step_tokens, 2 * step_tokens):  # gallop up; after two misses, bisect the rest
                candidate = min(low + jump, ceiling_tokens)
                if candidate == low:
                    break
                if not fits(candidate):
                    high = candidate
                    break
                low = candidate
        else:
            high = guess
            for jump in (step_tokens, 2 * step_tokens):
                candidate = max(high - jump, floor_tokens)
                if candidate == high:
                    break
                if fits(candidate):
                    low = candidate
                    break
                high = candidate
    if low not in cache and not fits(low):
        return result  # not even the floor fits this budget
    if not cache.get(low, False):
        return result
    while high - low > step_tokens:
        middle = grid((low + high) / 2)
        if middle <= low:
            middle = low + step_tokens
        if fits(middle):
            low = middle
        else:
            high = middle
    result.max_context_tokens = low
    result.safe_context_tokens = safe_from_largest(low, safety_margin, step_tokens)
    return result
