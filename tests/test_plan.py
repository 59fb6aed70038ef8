"""Planning from the whole-cache memory model, the budget and the real sizes: slots, per-slot context, KV type,
chunk size, savings, refusals; and the plan checked against the real server."""

from __future__ import annotations

import json

import pytest
from batch_helpers import kvbatch
from kvbatch.batch.inputs.sizes import SizeProfile
from kvbatch.batch.plan.memory import MemoryModel
from kvbatch.batch.plan.plan import PlanError, PlanInputs, make_plan
from kvbatch.measure.budget import Budget
from kvbatch.measure.kvmodel import GEMMA3_270M, KvCacheTypes, architecture_from_metadata
from kvbatch.measure.loaders import EmbeddedLoader
from kvbatch.measure.result import load_measurement
from kvbatch.measure.steps import kv_growth, result_file, safe_context
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.server import EmbeddedServer, default_model_path
from ollama_fixtures import GEMMA3_12B_MODEL_INFO

GIB = 2**30
MIB = 2**20


def sizes(**changes) -> SizeProfile:
    base = dict(
        request_count=1000,
        system_prompt_tokens=2400,
        prefix_count=1,
        user_tokens_p50=608,
        user_tokens_p99=608,
        max_tokens_p99=300,
        max_tokens_mean=300.0,
        longest_request_id="c-7",
        longest_request_tokens=3316,
        chars_per_token=4.0,
        token_source="test",
    )
    base.update(changes)
    return SizeProfile(**base)


def card_16gib(base_gib: float = 8.0, **model) -> PlanInputs:
    arch = architecture_from_metadata(GEMMA3_12B_MODEL_INFO)
    memory = MemoryModel(arch, base_gib * GIB, KvCacheTypes(), checkpoints_in_budget=False, **model)
    budget = Budget(int(16 * GIB * 0.9), "16 GiB card x 90%", "gpu", on_gpu=True)
    return PlanInputs(memory=memory, budget=budget, trained_context_tokens=arch.context_length_trained)


def test_the_original_case_gemma3_12b_on_a_16_gib_card():
    """170,000 requests, a 2,400-token criteria prompt, 600-token messages, 300-token answers.

    Worked out by hand: a slot needs 2400 + 8 + 608 + 300 = 3316 tokens, +5 % = 3482, on the 256 grid 3584. Per
    slot (f16): global 8 layers x 8 KiB x 3584 = 224 MiB, sliding window 40 layers x 8 KiB x 1536 cells = 480 MiB:
    704 MiB. The budget 14.4 GiB less the 8 GiB base leaves 6.4 GiB, of which 80 % = 5,242.9 MiB for the cache:
    7 slots (4,928 MiB = 4.81 GiB). Slope x context would have said 7 x 224 MiB = 1.53 GiB.
    """
    plan = make_plan(sizes(request_count=170_000), card_16gib())
    assert (plan.layout.slots, plan.layout.slot_context_tokens) == (7, 3584)
    assert plan.memory.kv_cache_bytes == 7 * 704 * MIB
    assert plan.memory.global_bytes == 7 * 224 * MIB and plan.memory.sliding_bytes == 7 * 480 * MIB
    assert "KV cache 4.81 GiB (global 1.53 GiB, sliding window 3.28 GiB)" in plan.describe()
    record = plan.record()
    assert record.kv_cache_bytes == 7 * 704 * MIB and record.parallel_slots == 7


def test_kv_type_auto_takes_the_type_that_fits_the_most_slots():
    inputs = card_16gib()
    inputs.kv_types = (KvCacheTypes("f16", "f16"), KvCacheTypes("q8_0", "q8_0"))
    plan = make_plan(sizes(request_count=170_000), inputs)
    assert plan.kv_types.label == "q8_0-q8_0"
    assert plan.layout.slots == 14  # 374 MiB per slot: 5,242.9 // 374
    assert any("f16-f16: 7 slot(s), q8_0-q8_0: 14 slot(s)" in note for note in plan.notes)


def test_the_measured_slope_replaces_the_predicted_global_slope():
    inputs = card_16gib(measured_slope=2 * 64 * 1024, measured_types=KvCacheTypes())  # the server spends twice
    plan = make_plan(sizes(request_count=170_000), inputs)
    assert plan.memory.global_bytes == pytest.approx(plan.layout.slots * 2 * 224 * MIB)
    assert plan.memory.sliding_bytes == plan.layout.slots * 480 * MIB
    assert plan.layout.slots == 5  # 928 MiB per slot


def test_checkpoints_count_on_a_cpu_and_are_priced():
    memory = MemoryModel(GEMMA3_270M, 300 * MIB, KvCacheTypes(), ctx_checkpoints=3, checkpoints_in_budget=True)
    inputs = PlanInputs(memory=memory, budget=Budget(1 * GIB, "1 GiB", "user"))
    plan = make_plan(sizes(request_count=64), inputs)
    assert plan.memory.checkpoint_bytes == plan.layout.slots * 3 * 15 * 512 * KIB_
    memory = plan.memory
    assert memory.counted_bytes == pytest.approx(300 * MIB + memory.kv_cache_bytes + memory.checkpoint_bytes)


KIB_ = 1024

PROBE_LOG = """0.00.368.607 I print_info: n_vocab               = 262144
0.00.388.114 I llama_context:        CPU  output buffer size =     1.00 MiB
0.00.398.852 I sched_reserve:        CPU compute buffer size =    20.28 MiB
"""


def test_what_serving_adds_is_priced_from_the_probes_log_by_hand():
    """The 270M's probe (1 slot x 1024, no warm-up) logs a 20.28 MiB compute buffer and a 262,144-token vocabulary.
    At 4 slots x 3584 per stream, worked by hand: compute 20.28 MiB + 512 x 2 B x (3584 - 1024) = 22.78 MiB (the
    server logs 22.78 there); logits for 3 more slots 3 x 262,144 x 4 B = 3 MiB; samplers 4 x 262,144 x 12 B = 12 MiB;
    the allowance 4 x 2 MiB: 45.78 MiB in all. On a GPU the probe's device buffer is in its base: only the mask
    grows."""
    from kvbatch.batch.plan.memory import ServingMemory
    from kvbatch.serve.log import parse_server_log

    log = parse_server_log(PROBE_LOG)
    assert log.vocab_size == 262144 and log.output_buffer_bytes == {"CPU": 1 * MIB}
    serving = ServingMemory.from_probe_log(log, probe_context=1024, on_gpu=False)
    assert serving.compute_bytes(3584) == pytest.approx(22.78 * MIB, abs=0.01 * MIB)
    assert serving.bytes_for(4, 3584) == pytest.approx(45.78 * MIB, abs=0.01 * MIB)
    gpu = ServingMemory.from_probe_log(parse_server_log(PROBE_LOG.replace("CPU compute", "CUDA0 compute")),
                                       probe_context=1024, on_gpu=True)  # fmt: skip
    assert gpu.bytes_for(4, 3584) == pytest.approx(2.5 * MIB)
    memory = MemoryModel(GEMMA3_270M, 312 * MIB, KvCacheTypes(), ctx_checkpoints=3, serving=serving)
    planned = memory.breakdown(SlotLayout(4, 3584))
    assert planned.serving_bytes == pytest.approx(45.78 * MIB, abs=0.01 * MIB)
    assert planned.counted_bytes == pytest.approx(
        312 * MIB + planned.kv_cache_bytes + planned.checkpoint_bytes + planned.serving_bytes
    )


def test_json_answers_price_the_grammar_on_the_host_once_per_server_and_a_little_per_slot():
    """A batch asking for JSON answers: the 270M's vocabulary of 262,144 x 680 B = 170 MiB once per server (what
    bench/json_soak.py measured above the free-text plan: 163 MiB at 1 slot, 167 at 4), plus 2 MiB a slot; on a GPU
    the grammar is host memory, outside the card's budget."""
    from dataclasses import replace

    from kvbatch.batch.plan.memory import ServingMemory
    from kvbatch.serve.log import parse_server_log

    text = ServingMemory.from_probe_log(parse_server_log(PROBE_LOG), probe_context=1024, on_gpu=False)
    json_answers = replace(text, json_answers=True)
    for slots in (1, 4, 16):
        added = json_answers.bytes_for(slots, 3584) - text.bytes_for(slots, 3584)
        assert added == pytest.approx(262144 * 680 + slots * 2 * MIB), slots
    gpu = ServingMemory.from_probe_log(parse_server_log(PROBE_LOG.replace("CPU compute", "CUDA0 compute")),
                                       probe_context=1024, on_gpu=True)  # fmt: skip
    assert replace(gpu, json_answers=True).bytes_for(4, 3584) == gpu.bytes_for(4, 3584)


def test_a_request_that_cannot_fit_is_named():
    with pytest.raises(PlanError, match="the largest request, 'c-7', needs about 200000 tokens"):
        make_plan(sizes(longest_request_tokens=200_000), card_16gib())
    with pytest.raises(PlanError, match="at most .* fit one slot"):
        make_plan(sizes(longest_request_tokens=100_000), card_16gib(base_gib=13.5))


def test_a_forced_small_context_is_noted_not_refused():
    plan = make_plan(sizes(), card_16gib(), requested_context=2048)
    assert plan.layout.slot_context_tokens == 2048
    assert any("fail alone, into errors.jsonl" in note for note in plan.notes)


def test_conversation_plan_chunks_requests_into_one_slot():
    plan = make_plan(sizes(), card_16gib(), mode="conversation")
    assert plan.layout.slots == 1 and plan.layout.slot_context_tokens >= 32768
    turn = 2 * 8 + 608 + 300
    assert plan.chunk_size == (plan.layout.slot_context_tokens - 2400 - 8) // turn


def test_the_time_estimate_uses_the_sustained_rate_at_the_same_layout():
    inputs = card_16gib()
    inputs.sustained_rate = (7, 3584, 2.0)
    assert make_plan(sizes(request_count=100), inputs).estimated_seconds == 50.0
    inputs.sustained_rate = (4, 3584, 2.0)  # measured at another layout: not used
    inputs.seconds_per_prompt_token, inputs.seconds_per_answer_token = 0.001, 0.01
    plan = make_plan(sizes(request_count=100), inputs)
    assert plan.estimated_seconds == pytest.approx(100 * (608 * 0.001 + 300 * 0.01) / 7 + 2400 * 0.001 * 7)


@pytest.fixture(scope="module")
def demo_measurement(tmp_path_factory):
    """What a default `make measure` leaves: a fit, and a safe context under the 2-core demo budget."""
    root = tmp_path_factory.mktemp("measured")
    types = KvCacheTypes()
    out = result_file("embedded", None, None, types, root / "data" / "measurements")
    loader = EmbeddedLoader(ServerConfig())
    try:
        kv_growth(loader, GEMMA3_270M, types, [2048, 8192], 1, 2048, [0.5], out, backend="embedded",
                  model=default_model_path().name)  # fmt: skip
        safe_context(loader, GEMMA3_270M, "+24MiB", margin=0.8, floor_tokens=1024, step_tokens=1024,
                     fill_fraction=0.0, out=out, backend="embedded", model=default_model_path().name, types=types,
                     ceiling_tokens=16384)  # fmt: skip
    finally:
        loader.close()
    return root, out


def test_after_a_default_measure_the_batch_plans_from_the_users_budget(demo_measurement, tmp_path):
    root, out = demo_measurement
    measured = load_measurement(out)
    assert measured.budget_is_demo and measured.safe_context_tokens and measured.kv_bytes_per_token
    from batch_helpers import small_batch

    batch = small_batch(root / "in.jsonl", 64)
    result = kvbatch("plan", str(batch), "--json", "--memory-budget", "3GiB", cwd=root)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["measurement_file"] == str(out.relative_to(root))
    assert plan["budget_bytes"] == 3 * GIB and plan["parallel_slots"] == 16
    assert any("planned for 3.00 GiB (given)" in note and "2-core demo" in note for note in plan["notes"])
    default = json.loads(kvbatch("plan", str(batch), "--json", cwd=root).stdout)
    assert "available RAM" in default["budget"] and default["parallel_slots"] == 16


def test_plan_json_kv_cache_bytes_match_the_server_log(tmp_path):
    from batch_helpers import small_batch

    batch = small_batch(tmp_path / "in.jsonl", 40)
    result = kvbatch("plan", str(batch), "--json", "--memory-budget", "2GiB", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {"schema_version", "slot_context_tokens", "parallel_slots", "chunk_size", "mode", "measurement_file",
            "kv_cache_bytes"} <= set(plan)  # fmt: skip
    config = ServerConfig(context_tokens=plan["total_context_tokens"], parallel_slots=plan["parallel_slots"])
    with EmbeddedServer(config) as server:
        logged = server.log().kv_total_bytes
    assert abs(plan["kv_cache_bytes"] / logged - 1) < 0.02


def test_a_measurement_file_from_before_schema_2_is_migrated_and_used(tmp_path):
    """The old layout (sections fit/safe_context, named <gguf stem>__<types>.json) is read into today's model, moved
    to today's name, and planned from; a newer schema is refused with what to do."""
    from batch_helpers import small_batch
    from kvbatch.errors import UserInputError
    from kvbatch.measure.result import SCHEMA_VERSION, find_measurement, load_measurement

    folder = tmp_path / "data" / "measurements"
    folder.mkdir(parents=True)
    legacy = folder / "gemma-3-270m-q4_k_m__f16-f16.json"
    legacy.write_text(json.dumps({
        "fit": {"slope_bytes_per_token": 3110.0, "base_bytes": 330e6, "r_squared": 0.9999,
                "predicted_slope_bytes_per_token": 3072.0, "slope_ci95": [3100.0, 3120.0]},
        "safe_context": {"max_context_tokens": 7168, "safe_context_tokens": 5632, "budget_bytes": 476082176,
                         "budget": "0.443 GiB = the model serving at 1024 tokens (430 MiB) + 24 MiB"},
        "speeds": {"prompt_tokens_per_s": 316.0, "answer_tokens_per_s": 58.0},
    }))  # fmt: skip
    batch = small_batch(tmp_path / "in.jsonl", 8)
    plan = json.loads(kvbatch("plan", str(batch), "--json", cwd=tmp_path).stdout)
    moved = folder / "embedded__gemma-3-270m-q4_k_m.gguf__f16-f16.json"
    assert plan["measurement_file"] == "data/measurements/embedded__gemma-3-270m-q4_k_m.gguf__f16-f16.json"
    assert not legacy.exists() and moved.exists()
    migrated = load_measurement(moved)
    assert migrated.schema_version == SCHEMA_VERSION and migrated.kv_bytes_per_token == 3110.0
    assert migrated.budget_is_demo
    assert find_measurement("embedded", "gemma-3-270m-q4_k_m.gguf", KvCacheTypes(), folder) == moved
    moved.write_text(json.dumps({**json.loads(moved.read_text()), "schema_version": 9}))
    with pytest.raises(UserInputError, match="written by a newer kvbatch"):
        load_measurement(moved)
