"""Measurements on the real embedded server: the slope matches the architecture, memory stays flat while a
context fills, and the safe-context search finds a boundary that really holds."""

from __future__ import annotations

import pytest
from kvbatch.measure.kvmodel import GEMMA3_270M, kv_bytes_per_token
from kvbatch.measure import (
    EmbeddedLoader,
    fit_line,
    max_loads,
    search_safe_context,
    sweep_allocated,
    sweep_in_use,
    try_context,
)
from kvbatch.serve.server import ServerConfig

CONTEXTS = [2048, 8192, 16384, 32768]


@pytest.mark.parametrize("swa_full", [False, True], ids=["sliding-window", "swa-full"])
def test_measured_slope_is_within_5_percent_of_the_architecture(swa_full):
    points = sweep_allocated(EmbeddedLoader(ServerConfig(swa_full=swa_full)), CONTEXTS, repeats=1)
    assert {p.probe for p in points} == {"process-rss"}
    fit = fit_line([p.context_tokens for p in points], [p.used_bytes for p in points])
    predicted = kv_bytes_per_token(GEMMA3_270M, swa_full=swa_full)
    assert predicted == (18 if swa_full else 3) * 1024
    assert abs(fit.slope_bytes_per_token / predicted - 1) < 0.05, fit
    assert fit.r_squared > 0.99
    # and the server's own KV lines give the architecture's figure exactly
    log_fit = fit_line([p.context_tokens for p in points], [p.kv_log_bytes for p in points])
    assert log_fit.slope_bytes_per_token == pytest.approx(predicted, rel=1e-6)


def test_memory_stays_flat_while_the_allocated_context_fills():
    points = sweep_in_use(EmbeddedLoader(ServerConfig(swa_full=True)), 4096, [0.5, 0.95])
    assert points[-1].tokens_in_use > 3800
    growth = points[-1].used_bytes - points[0].used_bytes
    allocation = kv_bytes_per_token(GEMMA3_270M, swa_full=True) * (points[-1].tokens_in_use - points[0].tokens_in_use)
    assert abs(growth) < 0.1 * allocation  # filling costs (almost) nothing; allocating costs it all


def test_safe_context_search_finds_a_boundary_that_holds_under_a_real_cap():
    loader = EmbeddedLoader(ServerConfig(swa_full=True))
    with loader.load(1024) as loaded:
        base_virtual = loaded.memory().virtual_bytes
    # a cap that admits some contexts but not all: about 3,000 tokens more, at 20 KiB of address space each
    budget = base_virtual + 3000 * 20 * 1024
    step = 512
    result = search_safe_context(
        loader, budget, floor_tokens=1024, ceiling_tokens=32768, step_tokens=step, safety_margin=0.8
    )
    assert result.max_context_tokens is not None
    assert 1024 < result.max_context_tokens < 32768
    assert result.loads <= max_loads(1024, 32768, step)
    assert result.safe_context_tokens == int(result.max_context_tokens * 0.8) // step * step
    failed = [p for p in result.probes if not p.fits]
    # every "too big" is the server's own failure under the cap: an allocation, a thread, or a crash while serving
    assert failed and all(p.reason and p.reason != "loaded and served" for p in failed)
    # check both sides again, independently of the search: the boundary loads and serves, one step above fails
    assert try_context(loader, result.max_context_tokens, budget).fits
    above = try_context(loader, result.max_context_tokens + step, budget)
    assert not above.fits
    assert above.reason


def test_search_uses_the_fit_for_its_first_probes():
    loader = EmbeddedLoader(ServerConfig(swa_full=True))
    points = sweep_allocated(loader, [1024, 4096], repeats=1)
    fit = fit_line([p.context_tokens for p in points], [p.virtual_bytes for p in points])
    budget = int(fit.predict(3000))
    result = search_safe_context(
        loader, budget, floor_tokens=1024, ceiling_tokens=32768, step_tokens=512, fit=fit, fill_fraction=0.0
    )
    assert result.probes[0].context_tokens == 2560  # the fitted line's boundary, on the step grid
    plain = search_safe_context(
        loader, budget, floor_tokens=1024, ceiling_tokens=32768, step_tokens=512, fill_fraction=0.0
    )
    assert plain.max_context_tokens == result.max_context_tokens  # the cap's edge is deterministic (one arena)
    assert result.loads < plain.loads <= max_loads(1024, 32768, 512)
