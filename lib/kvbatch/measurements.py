"""The experiment suite's high-level steps, as the notebooks call them, and the result file the planner reads.

Each step returns plain data (DataFrames and dicts) for the notebook to plot, and merges its section into
`data/measurements/<model>__<kv variant>.json` before returning, so partial results survive a later failure.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd

from kvbatch.aio import run_sync
from kvbatch.kvmodel import KvArchitecture, architecture_from_gguf, architecture_from_metadata, kv_bytes_per_token
from kvbatch.measure import (
    EmbeddedLoader,
    LinearFit,
    Loader,
    OllamaLoader,
    Probe,
    fit_line,
    search_safe_context,
    sustained_load,
    sweep_allocated,
    sweep_in_use,
)
from kvbatch.plan import result_path as result_path  # the notebooks find the result file here
from kvbatch.probes import nvml_available
from kvbatch.server import ServerConfig, default_model_path


def update_result(path: Path, section: str, data: Any, **top: Any) -> dict[str, Any]:
    """Merge one section into the result file (written atomically) and return the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = json.loads(path.read_text()) if path.exists() else {}
    content.update(top)
    content[section] = data
    content["updated"] = dt.datetime.now().isoformat(timespec="seconds")
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(content, indent=2, default=str))
    temp.replace(path)
    return content


def make_loader(
    backend: str,
    *,
    url: str | None = None,
    model: str | None = None,
    config: ServerConfig | None = None,
    probe: str | None = None,
    log_dir: Path | None = None,
) -> Loader:
    if backend == "embedded":
        return EmbeddedLoader(
            config or ServerConfig(), probe=None if probe in (None, "auto") else probe, log_dir=log_dir
        )
    if backend == "ollama":
        if not url or not model:
            raise ValueError("the ollama backend needs url and model")
        return OllamaLoader(url, model, probe_field="size_vram" if nvml_available() else "size")
    raise ValueError(f"unknown backend {backend!r}; use embedded or ollama")


def architecture(
    backend: str, *, url: str | None = None, model: str | None = None, model_path: str | None = None
) -> KvArchitecture:
    """The model's attention shape: from the GGUF (embedded) or Ollama's /api/show model_info."""
    if backend == "ollama":
        import ollama

        info = ollama.Client(host=url).show(model).modelinfo or {}
        return architecture_from_metadata(dict(info), source=f"{url} /api/show {model}")
    return architecture_from_gguf(Path(model_path) if model_path else default_model_path())


def model_name(backend: str, model: str | None, model_path: str | None) -> str:
    if backend == "ollama":
        return str(model).replace(":", "-").replace("/", "-")
    return Path(model_path).name if model_path else default_model_path().name


def kv_growth(
    loader: Loader,
    arch: KvArchitecture,
    config: ServerConfig,
    contexts: list[int],
    repeats: int,
    fill_context: int,
    fill_fractions: list[float],
    out: Path,
) -> dict[str, Any]:
    """Sweep A (memory vs allocated context) with its fit and the prediction beside it; sweep B (memory vs tokens
    in use at one allocation). Saves the fit into the result file."""
    points_a = pd.DataFrame([asdict(p) for p in sweep_allocated(loader, contexts, repeats)])
    fit = fit_line(points_a["context_tokens"], points_a["used_bytes"])
    fits = {"used": fit}
    for column in ("virtual_bytes", "kv_log_bytes"):
        if column in points_a and points_a[column].notna().all():
            fits[column] = fit_line(points_a["context_tokens"], points_a[column])
    predicted = kv_bytes_per_token(
        arch, cache_type_k=config.cache_type_k, cache_type_v=config.cache_type_v, swa_full=config.swa_full
    )
    points_b = pd.DataFrame([asdict(p) for p in sweep_in_use(loader, fill_context, fill_fractions)])
    growth_b = float(points_b["used_bytes"].iloc[-1] - points_b["used_bytes"].iloc[0])
    section = {
        "probe": str(points_a["probe"].iloc[0]),
        "contexts": contexts,
        "repeats": repeats,
        "slope_bytes_per_token": fit.slope_bytes_per_token,
        "slope_ci95": fit.slope_ci95,
        "base_bytes": fit.base_bytes,
        "r_squared": fit.r_squared,
        "predicted_slope_bytes_per_token": predicted,
        "slope_vs_predicted": fit.slope_bytes_per_token / predicted - 1 if predicted else None,
        "virtual_slope_bytes_per_token": fits["virtual_bytes"].slope_bytes_per_token
        if "virtual_bytes" in fits
        else None,
        "virtual_base_bytes": fits["virtual_bytes"].base_bytes if "virtual_bytes" in fits else None,
        "log_kv_slope_bytes_per_token": fits["kv_log_bytes"].slope_bytes_per_token if "kv_log_bytes" in fits else None,
        "in_use_context_tokens": fill_context,
        "in_use_growth_bytes": growth_b,
        "in_use_max_tokens": int(points_b["tokens_in_use"].max()),
    }
    update_result(
        out,
        "fit",
        section,
        model=out.stem.split("__")[0],
        server_flags=loader.flags(),
        architecture=arch.as_dict(),
        trained_context_tokens=arch.context_length_trained,
        kv_bytes_per_token=fit.slope_bytes_per_token,
    )
    return {
        "points_allocated": points_a,
        "points_in_use": points_b,
        "fit": fit,
        "fits": fits,
        "predicted_slope": predicted,
        "section": section,
    }


def serving_anchor(loader: Loader, floor_tokens: int, fill_fraction: float) -> tuple[Probe, int]:
    """Load at the floor and serve a request filling it; return that probe and the memory it then held (its address
    space on a CPU, which the cap limits). Serving costs more than loading (buffers touched, prompt state), so
    the line that guides the search goes through this point rather than a load-only one."""
    started = time.perf_counter()
    on_gpu = nvml_available() or isinstance(loader, OllamaLoader)
    with loader.load(floor_tokens) as loaded:
        if fill_fraction > 0:
            loaded.fill(max(int(floor_tokens * fill_fraction) - 16, 1), max_tokens=4)
        point = loaded.memory()
    used = point.used_bytes if on_gpu or point.virtual_bytes is None else point.virtual_bytes
    return Probe(floor_tokens, True, "loaded and served", time.perf_counter() - started), used


def resolve_budget(budget: str | int, anchor_bytes: int, floor_tokens: int) -> tuple[int, str]:
    """A budget in bytes. "+24MiB" means headroom above what the model itself needs while serving at the floor
    context (on a CPU its address space, which the cap limits), so a search on a small machine stays quick:
    every probe that fits also serves a request filling it, at about 250 tokens/s on 2 cores."""
    from kvbatch.units import parse_bytes

    text = str(budget).strip()
    if not text.startswith("+"):
        value = parse_bytes(text, what="budget")
        return value, f"{value / 2**30:.2f} GiB"
    headroom = parse_bytes(text[1:], what="budget headroom")
    return anchor_bytes + headroom, (
        f"{(anchor_bytes + headroom) / 2**30:.3f} GiB = the model serving at "
        f"{floor_tokens} tokens ({anchor_bytes / 2**20:.0f} MiB) + "
        f"{headroom / 2**20:.0f} MiB"
    )


def safe_context(
    loader: Loader,
    arch: KvArchitecture,
    budget: str | int,
    *,
    margin: float,
    floor_tokens: int,
    step_tokens: int,
    fill_fraction: float,
    out: Path,
    ceiling_tokens: int | None = None,
) -> dict[str, Any]:
    """Search the largest context that loads and serves under the budget. The guiding line has the slope fitted
    in sweep A (of address space on a CPU, where the cap is) through the served floor point."""
    on_gpu = nvml_available() or isinstance(loader, OllamaLoader)
    anchor_probe, anchor_bytes = serving_anchor(loader, floor_tokens, fill_fraction)
    budget_bytes, budget_text = resolve_budget(budget, anchor_bytes, floor_tokens)
    saved = json.loads(out.read_text()).get("fit", {}) if out.exists() else {}
    slope = saved.get("slope_bytes_per_token") if on_gpu else saved.get("virtual_slope_bytes_per_token")
    fit = None
    if slope:
        fit = LinearFit(slope, anchor_bytes - slope * floor_tokens, saved.get("r_squared", 0.0), (slope, slope), 0)
    ceiling = ceiling_tokens or arch.context_length_trained or 131072
    result = search_safe_context(
        loader,
        budget_bytes,
        floor_tokens=floor_tokens,
        ceiling_tokens=ceiling,
        step_tokens=step_tokens,
        fit=fit,
        safety_margin=margin,
        fill_fraction=fill_fraction,
        enforce_budget=not on_gpu,
        known=[anchor_probe],
    )
    section = result.as_dict()
    section["enforced_by"] = "memory use vs budget (GPU / Ollama)" if on_gpu else "RLIMIT_AS cap on the server"
    section["ceiling_tokens"] = ceiling
    section["budget"] = budget_text
    update_result(out, "safe_context", section, safe_context_tokens=result.safe_context_tokens)
    probes = pd.DataFrame([asdict(p) for p in result.probes])
    return {"result": result, "probes": probes, "section": section, "budget_text": budget_text}


def sustained(
    config: ServerConfig,
    body: dict[str, Any],
    *,
    duration_s: float,
    in_flight: int,
    interval_s: float,
    out: Path,
    url: str | None = None,
    backend_name: str = "openai",
    model: str | None = None,
    drift_tolerance: float = 0.05,
) -> dict[str, Any]:
    """Hold a planned configuration under load for `duration_s` and check memory and throughput stay put."""
    from kvbatch.backends import get_backend
    from kvbatch.probes import pick_probe
    from kvbatch.server import EmbeddedServer

    async def go(base_url: str, pid: int | None, log_text) -> tuple[Any, dict[str, float]]:
        backend = get_backend(backend_name, base_url, **({"model": model} if model else {}))
        try:
            probe = pick_probe(
                None,
                pid=pid,
                ollama_url=base_url if backend_name == "ollama" else None,
                ollama_model=model,
                log_text=log_text,
            )
            first = await backend.chat(body)
            outcome = await sustained_load(
                backend,
                probe,
                body,
                duration_s=duration_s,
                in_flight=in_flight,
                interval_s=interval_s,
                drift_tolerance=drift_tolerance,
            )
            timings = first.timings
            speeds = {
                "prompt_tokens_per_s": timings.get("prompt_per_second"),
                "answer_tokens_per_s": timings.get("predicted_per_second"),
            }
            return outcome, speeds
        finally:
            await backend.aclose()

    if url:
        outcome, speeds = run_sync(go(url, None, None))
        flags: dict[str, Any] = {"url": url}
    else:
        with EmbeddedServer(replace(config, parallel_slots=max(config.parallel_slots, in_flight))) as server:
            outcome, speeds = run_sync(go(server.url, server.pid, server.log_text))
            flags = server.config.flags()
    section = asdict(outcome)
    section["server_flags"] = flags
    section["in_flight"] = in_flight
    update_result(out, "sustained", section, speeds=speeds)
    series = pd.DataFrame(outcome.memory_series, columns=["t_s", "used_bytes"])
    return {"result": outcome, "memory": series, "speeds": speeds, "section": section}
