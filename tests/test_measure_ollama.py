"""The measurement suite against Ollama's API (a local test double answering with Ollama's documented JSON):
changing num_ctx reloads the model, /api/ps gives its size, an out-of-memory load is HTTP 500."""

from __future__ import annotations

import pytest
from kvbatch.measure.kvmodel import GEMMA3_270M, KIB, kv_bytes_per_token
from kvbatch.measure import OllamaLoader, fit_line, search_safe_context, sweep_allocated
from kvbatch.measurements import architecture
from ollama_double import MODEL


def test_sweep_against_ollama_reads_api_ps_and_fits_its_slope(ollama_double):
    loader = OllamaLoader(ollama_double.url, MODEL)
    points = sweep_allocated(loader, [2048, 4096, 8192], repeats=1, settle_s=0)
    assert {p.probe for p in points} == {"ollama-ps"}
    assert [r["options"]["num_ctx"] for r in ollama_double.double.received] == [2048, 4096, 8192]
    fit = fit_line([p.context_tokens for p in points], [p.used_bytes for p in points])
    assert fit.slope_bytes_per_token == pytest.approx(3 * KIB)
    assert architecture("ollama", url=ollama_double.url, model=MODEL) == GEMMA3_270M
    assert kv_bytes_per_token(GEMMA3_270M) == pytest.approx(fit.slope_bytes_per_token)


def test_safe_context_against_ollama_treats_http_500_as_too_big(ollama_double):
    ollama_double.double.memory_limit_bytes = ollama_double.double.size_at(5000)
    loader = OllamaLoader(ollama_double.url, MODEL)
    result = search_safe_context(
        loader,
        10**12,
        floor_tokens=1024,
        ceiling_tokens=32768,
        step_tokens=256,
        enforce_budget=False,
        fill_fraction=0.1,
    )
    assert result.max_context_tokens == 4864
    assert any("requires more system memory" in p.reason for p in result.probes if not p.fits)
