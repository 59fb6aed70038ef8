"""`kvbatch measure`: the measurement notebooks, executed headless one after another, their HTML reports listed
in reports/index.html with their headline figures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from kvbatch import defaults
from kvbatch.defaults import MEASUREMENTS_DIR, NOTEBOOKS_DIR
from kvbatch.errors import UserInputError
from kvbatch.measure.kvmodel import KvCacheTypes
from kvbatch.measure.result import Measurement, load_measurement, measurement_path, model_identity
from kvbatch.measure.steps import ollama_server_settings
from kvbatch.report.render import render_notebook
from kvbatch.units import format_bytes, parse_bytes

STEPS = ("kv_growth", "safe_context", "sustained_load")


def headline(step: str, result: Measurement | None) -> dict[str, object]:
    if result is None:
        return {}
    if step == "kv_growth" and result.kv_bytes_per_token:
        return {"KiB/token": round(result.kv_bytes_per_token / 1024, 3),
                "predicted": round((result.kv_bytes_per_token_predicted or 0) / 1024, 3),
                "flags": len(result.findings)}  # fmt: skip
    if step == "safe_context" and result.largest_context_tokens is not None:
        return {"safe context": result.safe_context_tokens, "largest": result.largest_context_tokens,
                "loads": len(result.search_steps), "budget": format_bytes(result.budget_bytes or 0)}  # fmt: skip
    if step == "sustained_load" and result.sustained:
        return {"verdict": "PASSED" if result.sustained.passed else "FAILED", "requests": result.sustained.requests}
    return {}


def run_measurement_notebooks(
    *,
    backend: str,
    url: str | None,
    model: str | None,
    model_path: str | None,
    kv_type: str | None,
    parallel: int | None,
    contexts: list[int],
    repeats: int,
    budget: str,
    margin: float,
    duration_s: float,
    input_path: str,
    only: list[str],
    ceiling_s: float = defaults.SUSTAINED_CEILING_S,
    fill_context: int = defaults.CONTEXT_TOKENS,
) -> Iterator[str]:
    """Run the chosen notebooks; yield a line for each as it finishes, then the result in one line."""
    unknown = [step for step in only if step not in STEPS]
    if unknown:
        raise UserInputError(f"--only: unknown notebook(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    if budget.strip().lower() not in ("auto", "") and not budget.strip().startswith("+"):
        parse_bytes(budget, what="--budget")
    if backend == "ollama":
        types, parallel, source = ollama_server_settings(url, model, kv_type, parallel)
        yield f"Ollama's settings: {source}"
    else:
        types, parallel = KvCacheTypes(kv_type or "f16", kv_type or "f16"), 1
    identity = model_identity(backend, model, model_path)
    out = measurement_path(backend, identity, types, MEASUREMENTS_DIR)
    common = {"backend": backend, "url": url, "model": model, "model_path": model_path, "kv_type": types.k,
              "parallel": parallel}  # fmt: skip
    parameters = {
        "kv_growth": {**common, "contexts": contexts, "repeats": repeats, "fill_context": fill_context},
        "safe_context": {**common, "budget": budget, "safety_margin": margin},
        "sustained_load": {
            **common,
            "duration_s": duration_s,
            "ceiling_s": ceiling_s,
            "input_path": input_path,
            "budget": None if budget.startswith("+") else budget,
        },  # fmt: skip
    }
    stem = Path(identity).stem.replace(":", "-")
    for step in only:
        started = time.perf_counter()
        yield f"running notebooks/{step}.ipynb ..."
        html = render_notebook(
            NOTEBOOKS_DIR / f"{step}.ipynb",
            parameters[step],
            f"{step}-{stem}",
            title=f"{step.replace('_', ' ')}: {identity}",
            headline=lambda step=step: headline(step, load_measurement(out) if out.exists() else None),
        )
        yield f"  {html} ({time.perf_counter() - started:.0f} s)"
    if out.exists():
        result = load_measurement(out)
        if result.kv_bytes_per_token:
            safe = (
                f"safe context {result.safe_context_tokens} tokens under {result.budget}"
                if result.safe_context_tokens
                else "no safe context yet (the safe_context notebook)"
            )
            yield (
                f"slope {result.kv_bytes_per_token / 1024:.2f} KiB/token (predicted "
                f"{(result.kv_bytes_per_token_predicted or 0) / 1024:.2f}); {safe}; results: {out}"
            )
        for finding in result.findings:
            yield f"  flagged: {finding}"
    yield "reports: reports/index.html"
