"""`kvbatch measure --backend ollama` finishes on the user's own setup: an Ollama whose refusal of a long prompt names
no count and whose tokenizer counts more than one token per word; four parallel slots on a card the largest
context does not fit; fills that cannot be made at all. A point that does not fit, or a fill that could not be made,
is a result; the measurement goes on with what fits."""

from __future__ import annotations

import asyncio

from batch_helpers import kvbatch
from kvbatch.errors import ContextOverflowError
from kvbatch.measure.experiments import search_safe_context
from kvbatch.measure.kvmodel import GEMMA3_270M, kv_bytes_per_token
from kvbatch.measure.loaders import OllamaLoader
from kvbatch.measure.result import load_measurement
from kvbatch.serve.backends import get_backend
from ollama_emulator import OllamaEmulator, RunningEmulator

MODEL = "gemma3:270m"
MEASUREMENT = "data/measurements/ollama__gemma3-270m__f16-f16.json"


def test_the_emulator_refuses_a_long_prompt_as_ollamas_runner_does_naming_no_count():
    with RunningEmulator(OllamaEmulator(tokens_per_word=1.5)) as running:

        async def too_long() -> str:
            async with get_backend("ollama", running.url, model=MODEL) as backend:
                try:
                    await backend.generate(" hello" * 700, num_ctx=1024, max_tokens=1)  # 1,051 tokens
                except ContextOverflowError as exc:
                    return exc.server_message
            return "served"

        assert asyncio.run(too_long()) == "the input length exceeds the context length"


def test_a_fill_at_a_context_not_yet_filled_fits_when_the_refusal_names_no_count():
    """A fresh backend guesses one token per word; the server counts 1.5 and refuses 1,007 words at num_ctx 1,024
    without a count: the fill halves, learns the ratio from the reply, and fills the context, at each context of a
    safe-context search."""
    with RunningEmulator(OllamaEmulator(tokens_per_word=1.5)) as running:
        loader = OllamaLoader(running.url, MODEL)
        try:
            result = search_safe_context(loader, 10**12, floor_tokens=1024, ceiling_tokens=3072, step_tokens=1024,
                                         enforce_budget=False, fill_fraction=1.0)  # fmt: skip
            learned = loader.backend.fill_tokens_per_word
        finally:
            loader.close()
        prompts = [len(r["prompt"].split()) for r in running.emulator.received if len(r.get("prompt", "")) > 100]
    assert [s.fits for s in result.steps] == [True] * len(result.steps), result.steps
    assert result.max_context_tokens == 3072 and abs(learned - 1.5) < 0.02, (result, learned)
    assert prompts[0] == 1007 and max(prompts[1:]) * 1.5 <= 3072, prompts  # refused once, then sized right


def test_the_measurement_finishes_on_an_ollama_with_a_count_less_refusal_and_1_5_tokens_a_word(tmp_path):
    """kv_growth learns 1.5 tokens a word at its fills and records it; safe_context (a new loader) starts from it."""
    with RunningEmulator(OllamaEmulator(tokens_per_word=1.5)) as running:
        measured = kvbatch("measure", "--backend", "ollama", "--url", running.url, "--model", MODEL, "--parallel", "1",
                           "--kv-type", "f16", "--only", "kv_growth,safe_context", "--contexts", "2048,8192",
                           "--repeats", "1", "--fill-context", "2048", "--budget", "+16MiB", cwd=tmp_path)  # fmt: skip
    assert measured.returncode == 0, measured.stdout + measured.stderr
    measurement = load_measurement(tmp_path / MEASUREMENT)
    assert abs(measurement.server_flags["fill_tokens_per_word"] - 1.5) < 0.02, measurement.server_flags
    assert abs(measurement.kv_bytes_per_token / kv_bytes_per_token(GEMMA3_270M) - 1) < 0.05
    assert measurement.safe_context_tokens < measurement.largest_context_tokens
    assert not measurement.not_measured and all(s.fits or "held" in s.reason for s in measurement.search_steps)


def test_four_slots_on_a_card_the_largest_context_spills_from_give_a_slope_of_what_fits(tmp_path):
    """OLLAMA_NUM_PARALLEL=4 on a card where 4 x 32,768 cells put part of the model on the CPU: that point is
    recorded as "does not fit", the report marks it, and the slope comes from the contexts that fit."""
    per_token = kv_bytes_per_token(GEMMA3_270M) * 4
    with RunningEmulator(OllamaEmulator(parallel=4, card_bytes=2**40)) as running:
        loader = OllamaLoader(running.url, MODEL, parallel=4)
        try:
            with loader.load(8192) as loaded:
                at_8192 = loaded.memory().used_bytes
        finally:
            loader.close()
        running.emulator.card_bytes = int(at_8192 + per_token * 12288)  # 8,192 + 12,288 fit; 32,768 does not
        measured = kvbatch("measure", "--backend", "ollama", "--url", running.url, "--model", MODEL, "--parallel", "4",
                           "--kv-type", "f16", "--only", "kv_growth", "--contexts", "2048,8192,32768,16384",
                           "--repeats", "1", "--fill-context", "2048", cwd=tmp_path)  # fmt: skip
    assert measured.returncode == 0, measured.stdout + measured.stderr
    measurement = load_measurement(tmp_path / MEASUREMENT)
    assert [(n.context_tokens, n.what) for n in measurement.not_measured] == [(32768, "does not fit")]
    assert "size_vram < size" in measurement.not_measured[0].reason
    assert abs(measurement.kv_bytes_per_token / per_token - 1) < 0.05, (measurement.kv_bytes_per_token, per_token)
    report = (tmp_path / "reports" / "kv_growth-gemma3-270m.html").read_text()
    assert "does not fit" in report and "32,768" in report


def test_a_fill_no_size_of_which_is_taken_is_recorded_and_the_measurement_goes_on(tmp_path):
    """A tokenizer that counts one word as 3,000 tokens: at num_ctx 2,048 not even one word fits, so sweep B's
    allocation is recorded as "could not fill" with its reason, and the slope (sweep A at 4,096 and 8,192, where one
    word fits) is measured and saved all the same."""
    with RunningEmulator(OllamaEmulator(tokens_per_word=3000)) as running:
        measured = kvbatch("measure", "--backend", "ollama", "--url", running.url, "--model", MODEL, "--parallel", "1",
                           "--kv-type", "f16", "--only", "kv_growth", "--contexts", "4096,8192", "--repeats", "1",
                           "--fill-context", "2048", cwd=tmp_path)  # fmt: skip
    assert measured.returncode == 0, measured.stdout + measured.stderr
    measurement = load_measurement(tmp_path / MEASUREMENT)
    assert measurement.kv_bytes_per_token and measurement.in_use_growth_bytes is None
    assert [(n.context_tokens, n.what) for n in measurement.not_measured] == [(2048, "could not fill")]
    assert "refused even a one-word fill" in measurement.not_measured[0].reason
    assert "could not fill" in (tmp_path / "reports" / "kv_growth-gemma3-270m.html").read_text()


def test_a_sustained_load_at_a_layout_ollama_splits_with_the_cpu_does_not_pass():
    """However low the memory figure stayed, a layout with part of the model on the CPU (0 < size_vram / size < 1)
    does not fit: the sustained load fails with that reason; all on the card, or a CPU machine (no card), it stands."""
    from kvbatch.measure.sustained import SustainedResult, judge_fit

    passed = SustainedResult(60.0, 8, [], 4, 10.0, [8], [], 500 * 2**20, 0.0, None, True)
    split = judge_fit(passed, 0.87)
    assert not split.passed and "does not fit: Ollama put 87% of the model on the GPU" in split.reasons[-1]
    assert judge_fit(passed, 1.0).passed and judge_fit(passed, 0.0).passed and judge_fit(passed, None).passed


def test_a_floor_that_does_not_fit_the_card_is_a_result_and_the_search_finishes(tmp_path):
    """A card smaller than the model at the search's floor: the floor is recorded as "does not fit" (spilled to the
    CPU), the search finds nothing, and the notebook finishes saying so."""
    with RunningEmulator(OllamaEmulator(card_bytes=200 * 2**20)) as running:
        measured = kvbatch("measure", "--backend", "ollama", "--url", running.url, "--model", MODEL, "--parallel", "1",
                           "--kv-type", "f16", "--only", "safe_context", "--budget", "8GiB", cwd=tmp_path)  # fmt: skip
    assert measured.returncode == 0, measured.stdout + measured.stderr
    measurement = load_measurement(tmp_path / MEASUREMENT)
    assert measurement.largest_context_tokens is None and measurement.safe_context_tokens is None
    assert [(s.context_tokens, s.fits) for s in measurement.search_steps] == [(1024, False)]
    assert "size_vram < size" in measurement.search_steps[0].reason
    assert "not even the floor" in (tmp_path / "reports" / "safe_context-gemma3-270m.html").read_text()
