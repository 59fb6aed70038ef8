"""Measurements on the real embedded server: the slope matches the architecture, memory stays flat while a context
fills, the safe-context search finds a boundary that really holds and keeps its load bound, and sustained load
fails when it should."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from kvbatch.batch.inputs.sample import candidate_message, system_prompt
from kvbatch.errors import NotFoundError
from kvbatch.measure.experiments import (
    LinearFit,
    MeasurementError,
    findings,
    fit_line,
    max_loads,
    repeat_spread,
    safe_from_largest,
    search_safe_context,
    sweep_allocated,
    sweep_in_use,
    try_context,
)
from kvbatch.measure.kvmodel import GEMMA3_270M, KvCacheTypes, kv_bytes_per_token
from kvbatch.measure.loaders import EmbeddedLoader, LoadedModel, Loader, LoadPoint, TooBigError
from kvbatch.measure.sustained import sustained_load
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.probes import ProcessRssProbe
from kvbatch.serve.server import EmbeddedServer

CONTEXTS = [2048, 8192, 16384, 32768]


@pytest.fixture
def loader_for():
    made = []

    def make(config: ServerConfig) -> EmbeddedLoader:
        made.append(EmbeddedLoader(config))
        return made[-1]

    yield make
    for loader in made:
        loader.close()


@pytest.mark.parametrize("swa_full", [False, True], ids=["sliding-window", "swa-full"])
def test_measured_slope_is_within_5_percent_of_the_architecture(loader_for, swa_full):
    points = sweep_allocated(loader_for(ServerConfig(swa_full=swa_full)), CONTEXTS, repeats=1)
    assert {p.probe for p in points} == {"process-rss"}
    fit = fit_line([p.context_tokens for p in points], [p.used_bytes for p in points])
    predicted = kv_bytes_per_token(GEMMA3_270M, KvCacheTypes(swa_full=swa_full))
    assert predicted == (18 if swa_full else 3) * 1024
    assert abs(fit.slope_bytes_per_token / predicted - 1) < 0.05, fit
    assert fit.r_squared > 0.99
    assert findings(fit, predicted, repeat_spread(points), points) == []
    # and the server's own KV lines give the architecture's figure exactly
    log_fit = fit_line([p.context_tokens for p in points], [p.kv_log_bytes for p in points])
    assert log_fit.slope_bytes_per_token == pytest.approx(predicted, rel=1e-6)


def test_memory_stays_flat_while_the_allocated_context_fills(loader_for):
    points = sweep_in_use(loader_for(ServerConfig(swa_full=True)), 4096, [0.5, 0.95])
    assert points[-1].tokens_in_use > 3800
    growth = points[-1].used_bytes - points[0].used_bytes
    allocation = kv_bytes_per_token(GEMMA3_270M, KvCacheTypes(swa_full=True)) * (
        points[-1].tokens_in_use - points[0].tokens_in_use
    )
    assert abs(growth) < 0.1 * allocation  # filling costs (almost) nothing; allocating costs it all


def test_safe_context_search_finds_a_boundary_that_holds_under_a_real_cap(loader_for):
    loader = loader_for(ServerConfig(swa_full=True))
    with loader.load(1024) as loaded:
        base_virtual = loaded.memory().virtual_bytes
    # a cap that admits some contexts but not all: about 1,500 tokens more, at 20 KiB of address space each (each
    # context that fits is filled whole, so a small boundary keeps the prompt tokens few on a slow machine)
    budget = base_virtual + 1500 * 20 * 1024
    step = 512
    result = search_safe_context(loader, budget, floor_tokens=1024, ceiling_tokens=32768, step_tokens=step)
    assert result.max_context_tokens is not None
    assert 1024 < result.max_context_tokens < 32768
    assert result.loads <= max_loads(1024, 32768, step)
    assert result.safe_context_tokens == safe_from_largest(result.max_context_tokens, 0.8, step)
    assert result.safe_context_tokens < result.max_context_tokens
    failed = [p for p in result.steps if not p.fits]
    assert failed and all(p.reason and p.reason != "loaded and served" for p in failed)
    # check both sides again, independently of the search: the boundary loads and serves, one step above fails
    assert try_context(loader, result.max_context_tokens, budget).fits
    above = try_context(loader, result.max_context_tokens + step, budget)
    assert not above.fits and above.reason


def test_search_uses_the_fit_for_its_first_probe_and_agrees_with_plain_bisection(loader_for):
    loader = loader_for(ServerConfig(swa_full=True))
    points = sweep_allocated(loader, [1024, 4096], repeats=1)
    fit = fit_line([p.context_tokens for p in points], [p.virtual_bytes for p in points])
    budget = int(fit.predict(3000))
    result = search_safe_context(loader, budget, floor_tokens=1024, ceiling_tokens=32768, step_tokens=512,
                                 guide=fit, fill_fraction=0.0)  # fmt: skip
    assert result.steps[0].context_tokens == 2560  # the fitted line's boundary, on the step grid
    plain = search_safe_context(loader, budget, floor_tokens=1024, ceiling_tokens=32768, step_tokens=512,
                                fill_fraction=0.0)  # fmt: skip
    assert plain.max_context_tokens == result.max_context_tokens  # the cap's edge is deterministic (one arena)
    assert result.loads < plain.loads <= max_loads(1024, 32768, 512)


class LineLoader(Loader):
    """Memory = 300 MiB + 20 KiB x context, over-budget loads fail: a loader whose truth is known, to check that the
    search keeps its bound whatever the guiding line says."""

    name = "line"

    def __init__(self, failure: Exception | None = None) -> None:
        self.loads = 0
        self.failure = failure

    @contextlib.contextmanager
    def load(self, context_tokens, memory_cap_bytes=None):
        self.loads += 1
        if self.failure is not None:
            raise self.failure
        used = 300 * 2**20 + 20 * 1024 * context_tokens
        if memory_cap_bytes and used > memory_cap_bytes:
            raise TooBigError(f"{used} > {memory_cap_bytes}")
        yield LineLoaded(LoadPoint(context_tokens, 0, used, "line"))


class LineLoaded(LoadedModel):
    def __init__(self, point: LoadPoint) -> None:
        self.point = point

    def memory(self) -> LoadPoint:
        return self.point

    def fill(self, tokens: int, max_tokens: int = 4) -> int:
        return tokens


@pytest.mark.parametrize("slope_error", [0.1, 0.5, 2.0, 10.0])
def test_a_poor_guide_never_costs_more_than_the_bound(slope_error):
    budget = 300 * 2**20 + 20 * 1024 * 50_000
    truth = 50_000 // 256 * 256
    guide = LinearFit(20 * 1024 * slope_error, 300 * 2**20, 1.0, (0, 0), 2)
    result = search_safe_context(LineLoader(), budget, floor_tokens=1024, ceiling_tokens=131072, step_tokens=256,
                                 guide=guide, fill_fraction=0.0)  # fmt: skip
    assert result.max_context_tokens == truth
    assert result.loads <= max_loads(1024, 131072, 256), [p.context_tokens for p in result.steps]


def test_a_load_that_fails_for_another_reason_is_an_error_not_too_big():
    loader = LineLoader(NotFoundError("HTTP 404: model 'x' not found"))
    with pytest.raises(MeasurementError, match="not for memory: HTTP 404"):
        search_safe_context(loader, 10**9, floor_tokens=1024, ceiling_tokens=8192, step_tokens=1024)


def test_findings_say_in_words_what_to_distrust():
    points = [LoadPoint(c, r, 300 * 2**20 + 9000 * c + (40 * 2**20 if (c, r) == (8192, 1) else 0), "rss")
              for r in (0, 1) for c in (2048, 4096, 8192, 16384)]  # fmt: skip
    fit = fit_line([p.context_tokens for p in points], [p.used_bytes for p in points])
    notes = findings(fit, 3072.0, repeat_spread(points), points)
    assert any("repeats disagree by up to" in n for n in notes)
    assert any("does not explain this server; the plan uses the measured slope" in n for n in notes)


def _bodies(count: int) -> list[dict]:
    import random

    rng = random.Random(5)
    system = system_prompt(300)
    return [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": candidate_message(rng, 40)}], "max_tokens": 4}
            for _ in range(count)]  # fmt: skip


def _sustain(
    server: EmbeddedServer,
    bodies: list[dict],
    budget: int | None,
    *,
    duration_s: float = 0.0,
    ceiling_s: float = 1800.0,
    slot_context_tokens: int | None = None,
):
    """A sustained load on the server's own layout: it ends when the load is filled, an error or the budget ends it,
    never on a clock a slower machine would miss (the ceiling is far beyond what any test needs)."""

    async def go():
        async with get_backend("openai", server.url, slot_pinning=True,
                               options=BackendOptions(api_key=server.api_key)) as backend:
            return await sustained_load(backend, ProcessRssProbe(server.pid), bodies, slots=2,
                                        slot_context_tokens=slot_context_tokens or server.config.slot_context_tokens,
                                        duration_s=duration_s, ceiling_s=ceiling_s, interval_s=2.0,
                                        budget_bytes=budget)  # fmt: skip

    return asyncio.run(go())


def test_sustained_load_runs_until_every_slot_served_its_context_and_fails_above_the_budget():
    with EmbeddedServer(ServerConfig(context_tokens=4096, parallel_slots=2)) as server:
        held = _sustain(server, _bodies(6), budget=4 * 2**30)
        assert held.passed, held.reasons
        assert held.stopped_by.startswith("every slot served its context (2,048 tokens)")
        assert all(s.requests >= 2 and s.tokens >= 2048 for s in held.served), held.served
        assert held.requests == sum(s.requests for s in held.served)
        assert held.memory_peak_bytes and held.prompt_tokens_per_s
        tiny = _sustain(server, _bodies(6), budget=50 * 2**20)
    assert not tiny.passed and tiny.stopped_by == "memory above the budget"
    assert any("above the budget 50 MiB" in reason for reason in tiny.reasons)


def test_sustained_load_fails_on_a_request_error():
    too_long = {"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 4}
    with EmbeddedServer(ServerConfig(context_tokens=2048, parallel_slots=2)) as server:
        outcome = _sustain(server, [*_bodies(2), too_long], budget=None)
    assert not outcome.passed and outcome.stopped_by == "a request error"
    assert any("request error(s), first: ContextOverflowError" in reason for reason in outcome.reasons)


def test_a_load_stopped_by_its_ceiling_before_the_slots_filled_does_not_pass(embedded_server):
    outcome = _sustain(embedded_server, _bodies(2), budget=None, ceiling_s=1.0, slot_context_tokens=10**9)
    assert not outcome.passed and outcome.stopped_by == "the ceiling of 1 s"
    assert any("before every slot had served its context once (slot 0:" in reason for reason in outcome.reasons)


def test_the_plans_memory_bounds_the_peak_of_a_sustained_load_at_the_plan(tmp_path):
    """The shipped sample (a JSON decision with a schema) planned for 2 slots and run at that plan on the real
    server until every slot served its context twice over: the peak stays under the plan's memory, the grammar
    sampler's included. Without what serving adds (its compute buffer, logits, samplers, the grammar) the same plan
    fell short of the peak (713 MiB against 546 planned at 4 slots), and a load whose peak passes the plan fails."""
    from dataclasses import replace

    from kvbatch import defaults
    from kvbatch.batch.run.runner import load_input, plan_only
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.batch.settings import BatchSettings
    from kvbatch.measure.sustained import judge_against_plan

    settings = BatchSettings(input_path=defaults.SAMPLE_INPUT, folder=RunFolder(tmp_path / "run"), slots=2,
                             slot_context_tokens=3584)  # fmt: skip
    prepared = plan_only(settings, say=lambda *_: None)
    plan, memory = prepared.plan, prepared.plan.memory
    assert memory is not None and memory.serving_bytes > 20 * 2**20
    assert plan.sizes.json_answers == 16 and memory.serving_bytes > 170 * 2**20  # the grammar's price is in
    _, requests_fn = load_input(settings)
    bodies = [request.body for request in itertools.islice(requests_fn(frozenset()), 8)]
    config = replace(prepared.plans[0].config, context_tokens=plan.layout.total_context_tokens,
                     parallel_slots=plan.layout.slots)  # fmt: skip
    with EmbeddedServer(config) as server:

        async def go():
            async with get_backend("openai", server.url, slot_pinning=True,
                                   options=BackendOptions(api_key=server.api_key)) as backend:
                return await sustained_load(backend, ProcessRssProbe(server.pid), bodies, slots=2,
                                            slot_context_tokens=3584, duration_s=0.0, ceiling_s=1800.0,
                                            planned_bytes=memory.counted_bytes)  # fmt: skip

        held = asyncio.run(go())
        checkpoints = server.log().checkpoint_bytes
    assert held.passed, held.reasons
    assert held.planned_bytes == int(memory.counted_bytes) >= held.memory_peak_bytes
    assert checkpoints  # the load made the checkpoints the plan prices
    unpriced = memory.counted_bytes - memory.serving_bytes
    assert held.memory_peak_bytes > unpriced  # what serving adds is real: the old plan was no bound
    judged = judge_against_plan(held, unpriced)
    assert not judged.passed and "above the plan's" in judged.reasons[-1]


def test_on_the_embedded_server_a_fill_at_a_context_not_yet_filled_is_exact_and_one_too_big_is_a_result():
    """The real llama-server counts a fill as asked at a context it has not filled before (its tokenizer, not a
    guess); a context above an address-space cap is a point that does not fit, and the sweep goes on."""
    loader = EmbeddedLoader(ServerConfig())
    try:
        with loader.load(1536) as loaded:
            assert loaded.fill(1520, max_tokens=1) == 1520
        points = sweep_allocated(loader, [1024, 2048], repeats=1, settle_s=0)
        capped = EmbeddedLoader(ServerConfig(memory_cap_bytes=int(points[0].virtual_bytes * 1.02)))
        try:
            with_cap = sweep_allocated(capped, [1024, 131072, 262144], repeats=1, settle_s=0)
        finally:
            capped.close()
    finally:
        loader.close()
    assert [(p.context_tokens, p.fits) for p in with_cap] == [(1024, True), (131072, False)], with_cap
    assert with_cap[1].reason and with_cap[1].used_bytes == 0
