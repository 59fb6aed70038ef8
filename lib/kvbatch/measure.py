"""The experiments: memory vs allocated context (sweep A), memory vs tokens in use (sweep B), the regression,
the safe-context search under a real memory budget, and sustained-load validation.

Each experiment loads the model through a `Loader`: the embedded llama-server (one process per context size,
optionally under an address-space cap) or a running Ollama (changing `num_ctx` reloads the model).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from scipy import stats

from kvbatch.errors import KvbatchError, ServerStartError
from kvbatch.probes import MemoryProbe, OllamaPsProbe, pick_probe
from kvbatch.server import CAPPED_STACK_BYTES, EmbeddedServer, ServerConfig


@dataclass
class LoadPoint:
    """One load of the model at one context: the memory every probe saw, and how it went."""

    context_tokens: int
    repeat: int
    used_bytes: int
    probe: str
    kv_log_bytes: int | None = None
    virtual_bytes: int | None = None
    load_s: float | None = None
    tokens_in_use: int = 0


class LoadedModel(abc.ABC):
    probe: MemoryProbe
    load_s: float

    @abc.abstractmethod
    def memory(self) -> LoadPoint:
        """Read the memory now."""

    @abc.abstractmethod
    def fill(self, tokens: int, max_tokens: int = 8) -> int:
        """Serve one request whose prompt is `tokens` long; return the prompt tokens the server reports."""


class Loader(abc.ABC):
    """Loads a model at a context size. `load()` is a context manager; a failed load raises KvbatchError."""

    name: str = ""

    @abc.abstractmethod
    def load(self, context_tokens: int, memory_cap_bytes: int | None = None) -> contextlib.AbstractContextManager: ...

    def flags(self) -> dict[str, Any]:
        return {}


class _EmbeddedLoaded(LoadedModel):
    def __init__(self, server: EmbeddedServer, probe_name: str | None) -> None:
        self.server = server
        assert server.pid is not None
        self.probe = pick_probe(probe_name, pid=server.pid, log_text=server.log_text)
        self.load_s = server.start_time_s or 0.0

    def memory(self) -> LoadPoint:
        try:
            virtual = psutil.Process(self.server.pid).memory_info().vms
        except psutil.NoSuchProcess:
            virtual = None
        return LoadPoint(
            self.server.config.context_tokens,
            0,
            self.probe.read(),
            self.probe.name,
            kv_log_bytes=self.server.log().kv_total_bytes,
            virtual_bytes=virtual,
            load_s=self.load_s,
        )

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        import json
        import urllib.request

        request = urllib.request.Request(
            self.server.url + path, json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=900) as reply:
            return json.loads(reply.read())

    def fill(self, tokens: int, max_tokens: int = 8) -> int:
        """llama-server's /completion takes token ids, so the prompt length is exact."""
        try:
            word = self._post("/tokenize", {"content": " hello", "add_special": False})["tokens"][-1]
            answer = self._post(
                "/completion", {"prompt": [word] * max(tokens, 1), "n_predict": max_tokens, "cache_prompt": False}
            )
        except OSError as exc:
            text = exc.read().decode() if hasattr(exc, "read") else str(exc)
            context = self.server.config.context_tokens
            time.sleep(0.2)
            if not self.server.is_running():
                line = self.server.log().failure_line or text
                raise KvbatchError(f"the server crashed serving {tokens} tokens at context {context}: {line}") from exc
            raise KvbatchError(f"a request of {tokens} tokens failed at context {context}: {text[:300]}") from exc
        return int((answer.get("timings") or {}).get("prompt_n") or answer.get("tokens_evaluated") or 0)


class EmbeddedLoader(Loader):
    """Starts llama-server once per load, with the given KV settings; the cap (RLIMIT_AS) makes OOM real."""

    name = "embedded"

    def __init__(self, config: ServerConfig | None = None, *, probe: str | None = None, log_dir: Path | None = None):
        # The same thread stacks with and without a cap, so a line fitted without one predicts where a cap bites.
        self.config = replace(
            config or ServerConfig(),
            thread_stack_bytes=(config.thread_stack_bytes if config else None) or CAPPED_STACK_BYTES,
        )
        self.probe = probe
        self.log_dir = log_dir

    def flags(self) -> dict[str, Any]:
        return self.config.flags()

    @contextlib.contextmanager
    def load(self, context_tokens: int, memory_cap_bytes: int | None = None) -> Iterator[LoadedModel]:
        config = replace(
            self.config,
            context_tokens=context_tokens,
            memory_cap_bytes=memory_cap_bytes or self.config.memory_cap_bytes,
        )
        log_path = self.log_dir / f"server-ctx{context_tokens}.log" if self.log_dir else None
        if log_path and log_path.exists():
            log_path.unlink()
        with EmbeddedServer(config, log_path=log_path) as server:
            yield _EmbeddedLoaded(server, self.probe)


class _OllamaLoaded(LoadedModel):
    def __init__(self, loader: OllamaLoader, context_tokens: int, load_s: float) -> None:
        self.loader = loader
        self.context_tokens = context_tokens
        self.probe = OllamaPsProbe(loader.url, loader.model, field=loader.probe_field)
        self.load_s = load_s

    def memory(self) -> LoadPoint:
        return LoadPoint(self.context_tokens, 0, self.probe.read(), self.probe.name, load_s=self.load_s)

    def fill(self, tokens: int, max_tokens: int = 8) -> int:
        reply = self.loader.generate(" ".join(["hello"] * tokens), self.context_tokens, max_tokens)
        return int(reply.get("prompt_eval_count") or 0)


class OllamaLoader(Loader):
    """A running Ollama: a request with a new `num_ctx` reloads the model; /api/ps reports its size."""

    name = "ollama"

    def __init__(self, url: str, model: str, *, probe_field: str = "size") -> None:
        import ollama

        self.url = url
        self.model = model
        self.probe_field = probe_field
        self._client = ollama.Client(host=url, timeout=900)

    def flags(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model}

    def generate(self, prompt: str, num_ctx: int, max_tokens: int) -> dict[str, Any]:
        import ollama

        try:
            reply = self._client.generate(
                self.model, prompt, options={"num_ctx": num_ctx, "num_predict": max_tokens}, keep_alive="10m"
            )
        except ollama.ResponseError as exc:
            raise KvbatchError(
                f"Ollama could not serve at num_ctx {num_ctx}: {exc.error}", status_code=exc.status_code
            ) from exc
        except ConnectionError as exc:
            raise KvbatchError(f"cannot reach Ollama at {self.url}: {exc}") from exc
        return reply.model_dump()

    @contextlib.contextmanager
    def load(self, context_tokens: int, memory_cap_bytes: int | None = None) -> Iterator[LoadedModel]:
        started = time.perf_counter()
        self.generate("hi", context_tokens, 1)
        yield _OllamaLoaded(self, context_tokens, time.perf_counter() - started)


# ---- sweep A and the fit ---------------------------------------------------------------------------------------
@dataclass
class LinearFit:
    """memory = base + slope x context, with the slope's 95 % confidence interval."""

    slope_bytes_per_token: float
    base_bytes: float
    r_squared: float
    slope_ci95: tuple[float, float]
    points: int

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
    return LinearFit(
        float(result.slope),
        float(result.intercept),
        float(result.rvalue**2),
        (float(result.slope - half), float(result.slope + half)),
        len(x),
    )


def sweep_allocated(
    loader: Loader,
    contexts: list[int],
    repeats: int = 1,
    *,
    settle_s: float = 0.3,
    on_point: Callable[[LoadPoint], None] | None = None,
) -> list[LoadPoint]:
    """Sweep A: load at each context (`repeats` times, interleaved) and read memory right after load."""
    points: list[LoadPoint] = []
    for repeat in range(repeats):
        for context in contexts:
            with loader.load(context) as loaded:
                time.sleep(settle_s)
                point = replace(loaded.memory(), repeat=repeat)
            points.append(point)
            if on_point:
                on_point(point)
    return points


def sweep_in_use(
    loader: Loader, context_tokens: int, fractions: list[float], *, on_point: Callable[[LoadPoint], None] | None = None
) -> list[LoadPoint]:
    """Sweep B: one load; serve requests that fill more and more of the context, reading memory after each."""
    points: list[LoadPoint] = []
    with loader.load(context_tokens) as loaded:
        # The first request of at least one micro-batch (512) touches the compute buffers once (about 25 MiB
        # here); that is a one-time cost, not a per-token one, so the baseline is read after it.
        warm_tokens = min(600, context_tokens // 2)
        loaded.fill(warm_tokens, max_tokens=1)
        point = replace(loaded.memory(), tokens_in_use=warm_tokens)
        points.append(point)
        for fraction in fractions:
            wanted = max(int(context_tokens * fraction) - 16, 1)
            used = loaded.fill(wanted, max_tokens=4)
            point = replace(loaded.memory(), tokens_in_use=used or wanted)
            points.append(point)
            if on_point:
                on_point(point)
    return points


# ---- safe-context search -----------------------------------------------------------------------------------------
@dataclass
class Probe:
    context_tokens: int
    fits: bool
    reason: str
    seconds: float


@dataclass
class SafeContextResult:
    """The largest context that loaded and served a request filling it, under the budget; and the margin applied."""

    max_context_tokens: int | None
    safe_context_tokens: int | None
    budget_bytes: int
    safety_margin: float
    step_tokens: int
    probes: list[Probe] = field(default_factory=list)

    @property
    def loads(self) -> int:
        return len(self.probes)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loads"] = self.loads
        return data


def try_context(
    loader: Loader, context_tokens: int, budget_bytes: int, *, fill_fraction: float = 1.0, enforce_budget: bool = True
) -> Probe:
    """Load at `context_tokens` under the budget and serve a request filling it. A failed start, an out-of-memory
    error, a crash, or memory above the budget (where the budget cannot be enforced by the OS) is 'too big'."""
    started = time.perf_counter()
    try:
        with loader.load(context_tokens, budget_bytes if enforce_budget else None) as loaded:
            if fill_fraction > 0:
                loaded.fill(max(int(context_tokens * fill_fraction) - 16, 1), max_tokens=4)
            used = loaded.memory().used_bytes
            if not enforce_budget and used > budget_bytes:
                return Probe(context_tokens, False, f"used {used} bytes > budget", time.perf_counter() - started)
    except ServerStartError as exc:
        return Probe(context_tokens, False, exc.failure_line or str(exc), time.perf_counter() - started)
    except KvbatchError as exc:
        return Probe(context_tokens, False, str(exc)[:300], time.perf_counter() - started)
    return Probe(context_tokens, True, "loaded and served", time.perf_counter() - started)


def search_safe_context(
    loader: Loader,
    budget_bytes: int,
    *,
    floor_tokens: int,
    ceiling_tokens: int,
    step_tokens: int = 256,
    fit: LinearFit | None = None,
    safety_margin: float = 0.8,
    fill_fraction: float = 1.0,
    enforce_budget: bool = True,
    known: list[Probe] | None = None,
    on_probe: Callable[[Probe], None] | None = None,
) -> SafeContextResult:
    """Bisection between `floor_tokens` and `ceiling_tokens` (the trained context) on a `step_tokens` grid.

    The fitted line picks the first probe (its predicted boundary); the search gallops from there until the
    answer flips, then bisects. An accurate line settles it in 2-4 loads; without one it is plain bisection,
    about log2(range/step) + 2 loads.
    """
    result = SafeContextResult(None, None, budget_bytes, safety_margin, step_tokens, probes=list(known or []))
    cache: dict[int, bool] = {probe.context_tokens: probe.fits for probe in known or []}

    def fits(context: int) -> bool:
        if context not in cache:
            probe = try_context(
                loader, context, budget_bytes, fill_fraction=fill_fraction, enforce_budget=enforce_budget
            )
            result.probes.append(probe)
            if on_probe:
                on_probe(probe)
            cache[context] = probe.fits
        return cache[context]

    def grid(tokens: float) -> int:
        return int(min(max(tokens // step_tokens * step_tokens, floor_tokens), ceiling_tokens))

    low, high = floor_tokens, ceiling_tokens + step_tokens  # invariant: low fits (once checked), high does not
    if fit is not None and fit.slope_bytes_per_token > 0:
        # Start at the line's boundary and gallop away from it (1, 2, 4... steps) until the answer flips:
        # an accurate line settles the search in 2-4 loads, a poor one costs a few more.
        guess = grid((budget_bytes - fit.base_bytes) / fit.slope_bytes_per_token)
        jump = step_tokens
        if fits(guess):
            low = guess
            while low < ceiling_tokens:
                candidate = min(low + jump, ceiling_tokens)
                if not fits(candidate):
                    high = candidate
                    break
                low, jump = candidate, jump * 2
        else:
            high = guess
            while high > floor_tokens:
                candidate = max(high - jump, floor_tokens)
                if fits(candidate):
                    low = candidate
                    break
                high, jump = candidate, jump * 2
            else:
                return result  # not even the floor fits this budget
    if low not in cache and not fits(low):
        return result  # not even the floor fits this budget
    while high - low > step_tokens:
        middle = grid((low + high) / 2)
        if middle <= low:
            middle = low + step_tokens
        if fits(middle):
            low = middle
        else:
            high = middle
    result.max_context_tokens = low
    result.safe_context_tokens = max(int(low * safety_margin) // step_tokens * step_tokens, floor_tokens)
    return result


def max_loads(floor_tokens: int, ceiling_tokens: int, step_tokens: int) -> int:
    """The bound the search keeps to: log2(range/step) + 2 (+1 for the floor check)."""
    return math.ceil(math.log2(max((ceiling_tokens - floor_tokens) / step_tokens, 1))) + 3


# ---- sustained load ---------------------------------------------------------------------------------------------
@dataclass
class SustainedResult:
    duration_s: float
    requests: int
    interval_s: float
    requests_per_interval: list[int]
    memory_series: list[tuple[float, int]]
    memory_drift_share: float
    throughput_floor_share: float
    passed: bool
    reasons: list[str]


async def sustained_load(
    backend,
    probe: MemoryProbe | None,
    body: dict[str, Any],
    *,
    duration_s: float,
    in_flight: int = 1,
    interval_s: float = 10.0,
    drift_tolerance: float = 0.05,
    throughput_tolerance: float = 0.5,
) -> SustainedResult:
    """Send `body` with `in_flight` concurrent workers for `duration_s`; pass if memory does not drift by more than
    `drift_tolerance` (last quarter vs first quarter) and no full interval falls below `throughput_tolerance` of
    the median interval."""
    started = time.perf_counter()
    finished: list[float] = []
    series: list[tuple[float, int]] = []
    stop = started + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop:
            await backend.chat(body, timeout_s=max(stop - time.perf_counter(), 1) + 120)
            finished.append(time.perf_counter() - started)

    async def sampler() -> None:
        while time.perf_counter() < stop:
            if probe is not None:
                series.append((time.perf_counter() - started, await asyncio.to_thread(probe.read)))
            await asyncio.sleep(1.0)

    await asyncio.gather(sampler(), *(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    intervals = max(int(elapsed // interval_s), 1)
    per_interval = [sum(1 for t in finished if i * interval_s <= t < (i + 1) * interval_s) for i in range(intervals)]
    reasons: list[str] = []
    drift = 0.0
    if len(series) >= 4:
        quarter = max(len(series) // 4, 1)
        first = np.mean([m for _, m in series[:quarter]])
        last = np.mean([m for _, m in series[-quarter:]])
        drift = float((last - first) / first) if first else 0.0
        if abs(drift) > drift_tolerance:
            reasons.append(f"memory drifted {drift:+.1%} (tolerance {drift_tolerance:.0%})")
    median = float(np.median(per_interval)) if per_interval else 0.0
    floor_share = min(per_interval) / median if median else 0.0
    if median == 0:
        reasons.append("no request finished within an interval")
    elif floor_share < throughput_tolerance:
        reasons.append(f"an interval fell to {floor_share:.0%} of the median throughput")
    return SustainedResult(
        elapsed, len(finished), interval_s, per_interval, series, drift, floor_share, not reasons, reasons
    )
