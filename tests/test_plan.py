"""Planning from limits and sizes: slots, per-slot context, chunk size, savings, refusals."""

from __future__ import annotations

import pytest
from kvbatch.plan import Limits, PlanError, SizeProfile, make_plan

LIMITS = Limits(
    safe_context_tokens=40000,
    kv_bytes_per_token=3072,
    base_bytes=300e6,
    budget_bytes=1e9,
    trained_context_tokens=32768,
    source="test",
)


def sizes(**changes) -> SizeProfile:
    base = dict(
        request_count=1000,
        system_prompt_tokens=2400,
        prefix_count=1,
        user_tokens_p50=600,
        user_tokens_p99=700,
        max_tokens_p99=300,
        max_tokens_mean=300.0,
        longest_request_id="c-7",
        longest_request_tokens=3420,
        chars_per_token=4.0,
        token_source="test",
    )
    base.update(changes)
    return SizeProfile(**base)


def test_independent_plan_fits_the_p99_request_in_each_slot():
    plan = make_plan(sizes(), LIMITS)
    assert plan.slot_context_tokens == 3840  # 2400 + 8 + 700 + 300 = 3408, +5 %, to 256
    assert plan.parallel_slots == 10  # 40000 // 3840
    assert plan.total_context_tokens == 38400
    assert plan.predicted_kv_bytes == 3072 * 38400
    # each slot pays the system prompt once; every other request only its own message
    assert plan.prompt_tokens_evaluated == 1000 * 600 + 2400 * 10
    assert plan.prompt_tokens_saved_share == pytest.approx(1 - 624000 / 3000000)


def test_conversation_plan_chunks_requests_into_one_slot():
    plan = make_plan(sizes(), LIMITS, mode="conversation")
    assert plan.parallel_slots == 1
    assert plan.slot_context_tokens == 32768
    assert plan.chunk_size == (32768 - 2400 - 8) // (16 + 700 + 300)


def test_the_plan_changes_when_the_system_prompt_grows():
    assert make_plan(sizes(system_prompt_tokens=6000, longest_request_tokens=7020), LIMITS).slot_context_tokens == 7424


def test_a_request_that_cannot_fit_is_named():
    with pytest.raises(PlanError, match="the largest request, 'c-7', needs about 40000 tokens"):
        make_plan(sizes(longest_request_tokens=40000), LIMITS)


def test_a_forced_small_context_is_noted_not_refused():
    plan = make_plan(sizes(), LIMITS, requested_context=2048)
    assert plan.slot_context_tokens == 2048
    assert any("fail alone, into errors.jsonl" in note for note in plan.notes)


def test_the_time_estimate_uses_measured_speeds():
    plan = make_plan(
        sizes(request_count=100),
        LIMITS,
        requested_slots=1,
        seconds_per_prompt_token=0.004,
        seconds_per_answer_token=0.02,
    )
    assert plan.estimated_seconds == pytest.approx(100 * (600 * 0.004 + 300 * 0.02) + 2400 * 0.004)
