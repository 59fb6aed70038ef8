"""The measurement suite's steps, as the notebooks call them. Each returns plain data (DataFrames and dicts) for the
notebook to plot, and saves its fields into the measurement file (measure/result.py) before returning, so partial
results survive a later failure."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from kvbatch import defaults
from kvbatch.aio import run_sync
from kvbatch.errors import FillError, KvbatchError
from kvbatch.measure.budget import Budget, resolve_budget
from kvbatch.measure.experiments import (
    LinearFit,
    MeasurementError,
    SearchStep,
    findings,
    fit_line,
    not_measured_reason,
    repeat_spread,
    search_safe_context,
    sweep_allocated,
    sweep_in_use,
)
from kvbatch.measure.kvmodel import (
    KvArchitecture,
    KvCacheTypes,
    architecture_from_gguf,
    architecture_from_metadata,
    kv_bytes_per_token,
)
from kvbatch.measure.loaders import EmbeddedLoader, Loader, OllamaLoader
from kvbatch.measure.ollama_settings import OllamaSettings, ollama_settings
from kvbatch.measure.result import (
    Measurement,
    NotMeasured,
    SearchStepRecord,
    Sustained,
    load_measurement,
    measurement_path,
    model_identity,
    update_measurement,
)
from kvbatch.serve.backends import get_backend
from kvbatch.serve.backends.base import is_local
from kvbatch.serve.build_record import build_summary
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.probes import nvml_available
from kvbatch.serve.server import default_model_path


def ollama_server_settings(url: str, model: str, cache_type: str | None,
                           parallel: int | None) -> tuple[KvCacheTypes, int, str]:  # fmt: skip
    """Ollama's KV cache types and parallel slots, as the server runs them (measure.ollama_settings), and where
    they came from."""

    async def infer() -> OllamaSettings:
        async with get_backend("ollama", url, model=model) as backend:
            arch = architecture_from_metadata(await backend.model_info(), source=f"{url} /api/show {model}")
            return await ollama_settings(backend, arch, kv_type=cache_type, parallel=parallel,
                                         trained_context=arch.context_length_trained)  # fmt: skip

    found = run_sync(infer())
    return found.types, found.parallel, found.source


async def _ollama_model_info(url: str, model: str) -> dict[str, Any]:
    async with get_backend("ollama", url, model=model) as backend:
        return await backend.model_info()


def architecture(
    backend: str, *, url: str | None = None, model: str | None = None, model_path: str | None = None
) -> KvArchitecture:
    """The model's attention shape: from the GGUF (embedded) or Ollama's /api/show model_info."""
    if backend == "ollama":
        if not url or not model:
            raise ValueError("the ollama backend needs url and model")
        return architecture_from_metadata(run_sync(_ollama_model_info(url, model)), source=f"{url} /api/show {model}")
    return architecture_from_gguf(Path(model_path) if model_path else default_model_path())


def make_loader(
    backend: str,
    *,
    url: str | None = None,
    model: str | None = None,
    config: ServerConfig | None = None,
    probe: str | None = None,
    parallel: int = 1,
    on_gpu: bool | None = None,
    log_dir: Path | None = None,
    measurement: Path | None = None,
) -> Loader:
    """The loader for a backend; `measurement`: the file this measurement writes, whose recorded tokens per word
    (Ollama) the fills start from, so the first fill at a context not yet filled is sized right."""
    if backend == "embedded":
        return EmbeddedLoader(config or ServerConfig(), probe=None if probe in (None, "auto") else probe,
                              log_dir=log_dir)  # fmt: skip
    if backend == "ollama":
        if not url or not model:
            raise ValueError("the ollama backend needs url and model")
        gpu = on_gpu if on_gpu is not None else (is_local(url) and nvml_available())
        saved = load_measurement(measurement) if measurement is not None and measurement.exists() else None
        learned = (saved.server_flags or {}).get("fill_tokens_per_word") if saved is not None else None
        return OllamaLoader(url, model, parallel=parallel, on_gpu=gpu,
                            fill_tokens_per_word=float(learned) if isinstance(learned, (int, float)) else None)
    raise ValueError(f"unknown backend {backend!r}; use embedded or ollama")


def result_file(backend: str, model: str | None, model_path: str | None, types: KvCacheTypes,
                out_dir: str | Path = defaults.MEASUREMENTS_DIR) -> Path:  # fmt: skip
    """Where this model's measurement lives (the same name `kvbatch run` looks up)."""
    return measurement_path(backend, model_identity(backend, model, model_path), types, Path(out_dir))


def predicted_slope(arch: KvArchitecture, types: KvCacheTypes, parallel: int) -> float:
    """Bytes per token of the context knob: `--ctx-size` at one slot, or `num_ctx` at `parallel` slots (Ollama
    allocates num_ctx x parallel)."""
    return kv_bytes_per_token(arch, types) * parallel


def kv_growth(
    loader: Loader,
    arch: KvArchitecture,
    types: KvCacheTypes,
    contexts: list[int],
    repeats: int,
    fill_context: int,
    fill_fractions: list[float],
    out: Path,
    *,
    backend: str,
    model: str,
    parallel: int = 1,
) -> dict[str, Any]:
    """Sweep A (memory vs allocated context) with its fit, the prediction and what the fit flags; sweep B (memory
    vs tokens in use at one allocation). Saves the fit into the measurement file."""
    raw = sweep_allocated(loader, contexts, repeats)
    fitting = [p for p in raw if p.fits]
    not_fitting = [NotMeasured(context_tokens=p.context_tokens, what=_what(p.reason), reason=p.reason)
                   for p in raw if not p.fits]  # fmt: skip
    if len({p.context_tokens for p in fitting}) < 2:
        raise MeasurementError(
            f"a slope needs two contexts that fit; only {sorted({p.context_tokens for p in fitting}) or 'none'} did "
            f"({'; '.join(f'{n.context_tokens}: {n.reason}' for n in not_fitting)}): give smaller --contexts"
        )
    points_a = pd.DataFrame([asdict(p) for p in raw])
    fitted = points_a[points_a["fits"]]
    fit = fit_line(fitted["context_tokens"], fitted["used_bytes"])
    fits = {"used": fit}
    for column in ("virtual_bytes", "kv_log_bytes"):
        if column in fitted and fitted[column].notna().all():
            fits[column] = fit_line(fitted["context_tokens"], fitted[column])
    predicted = predicted_slope(arch, types, parallel)
    spread = repeat_spread(fitting)
    notes = findings(fit, predicted, spread, fitting)
    points_b = pd.DataFrame([asdict(p) for p in sweep_in_use(loader, fill_context, fill_fractions)])
    filled = points_b[points_b["fits"]]
    not_fitting += [NotMeasured(context_tokens=fill_context, tokens=int(p.tokens_in_use) or None,
                                what=_what(p.reason), reason=p.reason)
                    for p in points_b.itertuples() if not p.fits]  # fmt: skip
    growth_b = float(filled["used_bytes"].iloc[-1] - filled["used_bytes"].iloc[0]) if len(filled) >= 2 else None
    result = update_measurement(
        out,
        backend=backend,
        model=model,
        types=types,
        parallel_slots=parallel,
        kv_bytes_per_token=fit.slope_bytes_per_token,
        kv_bytes_per_token_ci95=fit.slope_ci95 if all(map(math.isfinite, fit.slope_ci95)) else None,
        kv_bytes_per_token_predicted=predicted,
        base_bytes=fit.base_bytes,
        r_squared=fit.r_squared,
        repeat_spread_share=spread,
        findings=notes,
        probe=str(points_a["probe"].iloc[0]),
        contexts=contexts,
        repeats=repeats,
        address_space_bytes_per_token=fits["virtual_bytes"].slope_bytes_per_token if "virtual_bytes" in fits else None,
        in_use_growth_bytes=growth_b,
        in_use_context_tokens=fill_context,
        not_measured=not_fitting,
        server_flags=loader.flags(),
        build=_build(loader),
        architecture=arch.as_dict(),
        trained_context_tokens=arch.context_length_trained,
    )
    return {
        "points_allocated": points_a,
        "points_in_use": points_b,
        "fit": fit,
        "fits": fits,
        "predicted_slope": predicted,
        "findings": notes,
        "spread": spread,
        "result": result,
    }


def _learned_fill(loader: Loader, saved: Measurement | None) -> dict[str, Any]:
    """Ollama: the tokens per word this notebook's fills learned, kept for the next (the other flags stay)."""
    if loader.name != "ollama":
        return {}
    return {"server_flags": {**(saved.server_flags if saved else {}), **loader.flags()}}


def _what(reason: str) -> str:
    return "could not fill" if reason.startswith("could not fill") else "does not fit"


def _build(loader: Loader) -> dict[str, Any]:
    if loader.name != "embedded":
        return {}
    return build_summary()


def serving_anchor(loader: Loader, floor_tokens: int, fill_fraction: float) -> tuple[SearchStep, int]:
    """Load at the floor and serve a request filling it; return that probe and the memory it then held (on a CPU
    its address space, which a cap limits). Serving costs more than loading (buffers touched, prompt state), so
    the line that guides the search goes through this point rather than a load-only one."""
    import time

    started = time.perf_counter()
    served = "loaded and served"
    with loader.load(floor_tokens) as loaded:
        if fill_fraction > 0:
            try:
                loaded.fill(max(int(floor_tokens * fill_fraction) - 16, 1), max_tokens=4)
            except FillError as exc:  # the line then goes through what the load alone held
                served = f"loaded; could not fill: {exc}"[:300]
        point = loaded.memory()
    used = point.used_bytes if loader.on_gpu else point.capped_bytes
    return SearchStep(floor_tokens, True, served, time.perf_counter() - started), used


def safe_context(
    loader: Loader,
    arch: KvArchitecture,
    budget: str | int | None,
    *,
    margin: float,
    floor_tokens: int,
    step_tokens: int,
    fill_fraction: float,
    out: Path,
    backend: str,
    model: str,
    types: KvCacheTypes,
    ceiling_tokens: int | None = None,
) -> dict[str, Any]:
    """Search the largest context that loads and serves under the budget. The guiding line has the slope fitted in
    sweep A (of address space on a CPU, where the cap is) through the served floor point."""
    anchor_bytes: int | None = None
    try:
        anchor_probe, anchor_bytes = serving_anchor(loader, floor_tokens, fill_fraction)
    except KvbatchError as exc:  # not even the floor fits: a result (the search below then finds nothing)
        anchor_probe = SearchStep(floor_tokens, False, not_measured_reason(exc, floor_tokens), 0.0)
    resolved: Budget = resolve_budget(budget, on_gpu=loader.on_gpu, anchor_bytes=anchor_bytes,
                                      anchor_what=f"the model serving at {floor_tokens} tokens")  # fmt: skip
    saved: Measurement | None = load_measurement(out) if out.exists() else None
    slope = None
    if saved is not None:
        slope = saved.kv_bytes_per_token if loader.on_gpu else saved.address_space_bytes_per_token
        slope = slope or saved.kv_bytes_per_token
    guide = None
    if slope and anchor_bytes is not None:
        guide = LinearFit(slope, anchor_bytes - slope * floor_tokens, 0.0, (slope, slope), 0)
    ceiling = ceiling_tokens or arch.context_length_trained or 131072
    enforce_by_os = not loader.on_gpu and backend == "embedded"
    search = search_safe_context(
        loader,
        resolved.bytes,
        floor_tokens=floor_tokens,
        ceiling_tokens=ceiling,
        step_tokens=step_tokens,
        guide=guide,
        safety_margin=margin,
        fill_fraction=fill_fraction,
        enforce_budget=enforce_by_os,
        known=[anchor_probe],
    )
    enforced_by = "RLIMIT_AS cap on the server" if enforce_by_os else (
        "the card's memory and the server's NVML/`/api/ps` figure vs the budget" if loader.on_gpu
        else "the server's memory figure vs the budget"
    )  # fmt: skip
    result = update_measurement(
        out,
        backend=backend,
        model=model,
        types=types,
        budget_bytes=resolved.bytes,
        budget=resolved.text,
        budget_is_demo=resolved.is_demo,
        largest_context_tokens=search.max_context_tokens,
        safe_context_tokens=search.safe_context_tokens,
        safety_margin=margin,
        search_steps=[SearchStepRecord(**asdict(p)) for p in search.steps],
        enforced_by=enforced_by,
        **_learned_fill(loader, saved),
    )
    steps = pd.DataFrame([asdict(p) for p in search.steps])
    return {"result": search, "steps": steps, "budget": resolved, "enforced_by": enforced_by,
            "ceiling": ceiling, "measurement": result}  # fmt: skip


def save_sustained(out: Path, outcome, *, backend: str, model: str, types: KvCacheTypes, layout) -> Measurement:
    """Record a sustained-load outcome (measure/sustained.py) and the speeds it saw, for the planner's estimate."""
    speeds = {"prompt_tokens_per_s": outcome.prompt_tokens_per_s, "answer_tokens_per_s": outcome.answer_tokens_per_s}
    return update_measurement(
        out,
        backend=backend,
        model=model,
        types=types,
        sustained=Sustained(
            passed=outcome.passed,
            reasons=outcome.reasons,
            duration_s=outcome.duration_s,
            requests=outcome.requests,
            errors=len(outcome.errors),
            slots=layout.slots,
            slot_context_tokens=layout.slot_context_tokens,
            requests_per_s=outcome.requests_per_s,
            memory_peak_bytes=outcome.memory_peak_bytes,
            memory_drift_bytes=outcome.memory_drift_bytes,
            budget_bytes=outcome.budget_bytes,
            planned_bytes=outcome.planned_bytes,
            requests_per_interval=outcome.requests_per_interval,
            slot_requests=[s.requests for s in outcome.served],
            slot_tokens=[s.tokens for s in outcome.served],
            stopped_by=outcome.stopped_by,
            ceiling_s=outcome.ceiling_s,
        ),
        **{key: value for key, value in speeds.items() if value},
    )


def estimator_verdict(model_path: Path, arch: KvArchitecture, types: KvCacheTypes, contexts: list[int],
                      slot_counts: list[int], out: Path, *, backend: str, model: str,
                      fit_line: tuple[float, float] | None) -> dict[str, Any]:  # fmt: skip
    """Start the embedded server at every context and slot count, put each estimator's figure beside what it
    allocated and held (measure/estimators.py), and save the rows and the sentences into the measurement file."""
    from kvbatch.measure import estimators as E
    from kvbatch.measure.result import EstimatorRecord

    observed = E.observe_embedded(model_path, types, contexts, slot_counts)
    rows = E.judge(model_path, arch, types, observed, fit_line=fit_line)
    seen = {(o.context, o.slots): o for o in observed}
    records = [EstimatorRecord(**row.as_dict(), server_kv_bytes=seen[(row.context, row.slots)].kv_log_bytes,
                               server_after_load_bytes=seen[(row.context, row.slots)].after_load_bytes)
               for row in rows]  # fmt: skip
    said = E.sentences(rows, arch)
    update_measurement(out, backend=backend, model=model, types=types, estimators=records, estimator_verdicts=said)
    return {"rows": rows, "observed": observed, "sentences": said, "fit_params": E.fit_params_binary() is not None}
