"""Ollama as it really behaves, on an emulator backed by the real llama-server (tests/ollama_emulator.py):
measurement through its API, the offload point under a card size, a batch that sends the planned num_ctx and
survives a killed runner, a capped context, a silently cut prompt, and the truncation guard's false-alarm rate."""

from __future__ import annotations

import asyncio
import collections
import json

import pytest
from batch_helpers import (
    WAIT_CEILING_S,
    input_ids,
    kvbatch,
    replace_user_message,
    result_lines,
    small_batch,
    start_kvbatch,
    wait_for_results,
)
from conftest import REPO
from kvbatch.batch.inputs.openai_batch import iter_openai_batch, scan_openai_batch
from kvbatch.batch.inputs.sample import write_sample
from kvbatch.batch.run.execution.guard import TruncationGuard
from kvbatch.measure.experiments import fit_line, search_safe_context, sweep_allocated
from kvbatch.measure.kvmodel import GEMMA3_270M, kv_bytes_per_token
from kvbatch.measure.loaders import OllamaLoader
from kvbatch.measure.result import load_measurement
from kvbatch.serve.backends import BackendOptions, ChatResult, get_backend
from ollama_emulator import OllamaEmulator, RunningEmulator

MODEL = "gemma3:270m"


@pytest.fixture
def ollama():
    with RunningEmulator(OllamaEmulator()) as running:
        yield running


@pytest.mark.parametrize("parallel", [1, 2])
def test_measuring_through_the_ollama_api_gives_the_architectures_slope(parallel):
    with RunningEmulator(OllamaEmulator(parallel=parallel)) as running:
        loader = OllamaLoader(running.url, MODEL, parallel=parallel)
        try:
            points = sweep_allocated(loader, [2048, 8192, 16384], repeats=1, settle_s=0)
        finally:
            loader.close()
        assert running.emulator.loads == [2048, 8192, 16384]  # each num_ctx reloaded the model
    assert {p.probe for p in points} == {"ollama-ps"}
    fit = fit_line([p.context_tokens for p in points], [p.used_bytes for p in points])
    predicted = kv_bytes_per_token(GEMMA3_270M) * parallel  # Ollama allocates num_ctx x parallel
    assert abs(fit.slope_bytes_per_token / predicted - 1) < 0.05, (fit.slope_bytes_per_token, predicted)


def test_the_safe_search_stops_where_ollama_would_move_layers_to_the_cpu():
    with RunningEmulator(OllamaEmulator(card_bytes=2**40)) as running:
        loader = OllamaLoader(running.url, MODEL, on_gpu=True)
        try:
            with loader.load(2048) as loaded:
                small = loaded.memory().used_bytes
            running.emulator.card_bytes = card = small + 6000 * 3 * 1024  # about 8,000 tokens fit the "card"
            result = search_safe_context(loader, 10**12, floor_tokens=2048, ceiling_tokens=32768, step_tokens=512,
                                         enforce_budget=False, fill_fraction=0.0)  # fmt: skip
            assert 2048 < result.max_context_tokens < 32768
            assert any("size_vram < size" in p.reason for p in result.steps if not p.fits)
            with loader.load(result.max_context_tokens) as loaded:  # the boundary is all on the card
                assert loaded.memory().offloaded_share == 1.0
            asyncio.run(_fill(running.url, result.max_context_tokens + 512))
            entry = asyncio.run(_loaded(running.url))
            assert entry.size_bytes > card and entry.offloaded_to_cpu  # one step above spills
        finally:
            loader.close()


async def _fill(url: str, num_ctx: int) -> None:
    async with get_backend("ollama", url, model=MODEL) as backend:
        await backend.fill(1, context_tokens=num_ctx, max_tokens=1)


async def _loaded(url: str):
    async with get_backend("ollama", url, model=MODEL) as backend:
        return await backend.loaded()


def test_measure_then_run_through_ollama_use_one_measurement_file(ollama, tmp_path):
    """`kvbatch measure --backend ollama` writes the file `kvbatch run --backend ollama` plans from (the two named it
    differently before: gemma3-12b__... and gemma3:12b__...)."""
    measured = kvbatch("measure", "--backend", "ollama", "--url", ollama.url, "--model", MODEL, "--only", "kv_growth",
                       "--contexts", "2048,8192", "--repeats", "1", "--fill-context", "1024",
                       cwd=tmp_path)  # fmt: skip
    assert measured.returncode == 0, measured.stdout + measured.stderr
    out = tmp_path / "data" / "measurements" / "ollama__gemma3-270m__f16-f16.json"
    assert f"results: data/measurements/{out.name}" in measured.stdout
    assert load_measurement(out).kv_bytes_per_token
    report = (tmp_path / "reports" / "kv_growth-gemma3-270m.html").read_text()
    assert "The verdict on the estimators" in report and "rule (KV)" in report and "/api/ps size" in report
    batch = small_batch(tmp_path / "in.jsonl", 4)
    result = kvbatch("run", str(batch), "--backend", "ollama", "--url", ollama.url, "--model", MODEL, "--no-report",
                     "--no-progress", "--memory-budget", "2GiB", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "data" / "runs" / "in" / "plan.json").read_text())
    assert plan["measurement_file"] == f"data/measurements/{out.name}"
    assert plan["limits_source"].startswith("measured base and slope")
    assert {r["options"]["num_ctx"] for r in ollama.emulator.received if "messages" in r} == {
        plan["slot_context_tokens"]
    }


def test_a_batch_through_ollama_sends_the_planned_num_ctx_and_survives_a_killed_runner(ollama, tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 12)
    run_dir = tmp_path / "data" / "runs" / "ollama"
    process = start_kvbatch("run", str(batch), "--run", str(run_dir), "--backend", "ollama", "--url", ollama.url,
                            "--model", MODEL, "--no-report", "--no-progress", cwd=tmp_path)  # fmt: skip
    wait_for_results(run_dir, 3, process)
    ollama.emulator.kill_runner()  # kill -9 of the llama-server underneath, mid-run
    out, _ = process.communicate(timeout=WAIT_CEILING_S)
    assert process.returncode == 0, out
    ids = [r["custom_id"] for r in result_lines(run_dir)]
    assert sorted(ids) == sorted(input_ids(batch)) and not [i for i, n in collections.Counter(ids).items() if n > 1]
    plan = json.loads((run_dir / "plan.json").read_text())
    chats = [r for r in ollama.emulator.received if "messages" in r]
    sizes = {r["options"]["num_ctx"] for r in chats}
    assert plan["slot_context_tokens"] in sizes and all(r["truncate"] is False and r["stream"] is False
                                                        and r["keep_alive"] == "30m" for r in chats)  # fmt: skip
    events = result_lines(run_dir, "events.jsonl")
    assert any(e["event"] == "recovery" and "signal: killed" in e["cause"] for e in events)
    assert not (run_dir / "errors.jsonl").exists() or not result_lines(run_dir, "errors.jsonl")


def test_a_context_the_server_caps_stops_the_run_with_a_clear_message(tmp_path):
    with RunningEmulator(OllamaEmulator(context_cap=2048)) as running:
        batch = small_batch(tmp_path / "in.jsonl", 4)
        result = kvbatch(
            "run",
            str(batch),
            "--run",
            "capped",
            "--backend",
            "ollama",
            "--url",
            running.url,
            "--model",
            MODEL,
            "--no-report",
            "--no-progress",
            "--slot-ctx",
            "4096",
            cwd=tmp_path,
        )
    assert result.returncode == 2, result.stdout
    assert "Ollama loaded gemma3:270m with a context of 2048 tokens, not the 4096 asked for" in result.stderr
    assert "Traceback" not in result.stderr
    assert not result_lines(tmp_path / "data" / "runs" / "capped", "errors.jsonl")


def test_a_silently_cut_prompt_lands_in_errors_jsonl(tmp_path):
    with RunningEmulator(OllamaEmulator(honour_truncate=False)) as running:
        batch = small_batch(tmp_path / "in.jsonl", 4)
        long_request = replace_user_message(batch, 1, "Experience: " + "built a billing pipeline. " * 400)
        result = kvbatch("run", str(batch), "--run", "cut", "--backend", "ollama", "--url", running.url, "--model",
                         MODEL, "--no-report", "--no-progress", "--slot-ctx", "1536", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr  # done, one failed for good
    run_dir = tmp_path / "data" / "runs" / "cut"
    errors = result_lines(run_dir, "errors.jsonl")
    assert [e["custom_id"] for e in errors] == [long_request["custom_id"]]
    error = errors[0]["error"]
    assert error["code"] == "TruncatedPromptError" and error["prompt_tokens"] < 0.9 * error["expected_prompt_tokens"]
    assert len(result_lines(run_dir)) == 3


def test_requests_ollama_cannot_serve_are_refused_at_validation(ollama, tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 3)
    lines = batch.read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    first["body"]["n"] = 2
    second["body"]["tools"] = [{"type": "function", "function": {"name": "f"}}]
    batch.write_text("\n".join([json.dumps(first), json.dumps(second), lines[2]]) + "\n")
    result = kvbatch("run", str(batch), "--backend", "ollama", "--url", ollama.url, "--model", MODEL, cwd=tmp_path)
    assert result.returncode == 2
    assert f"{batch}:1: body.n: must be 1" in result.stderr
    assert f"{batch}:2: body.tools: tool calls are not run by a batch" in result.stderr
    assert ollama.emulator.received == []


@pytest.mark.parametrize("tokenizer", ["exact", "calibrated"])
def test_the_truncation_guard_raises_no_false_alarm(ollama, tmp_path, tokenizer):
    """Over the shipped sample and a 1,000-request generated batch, with the prompt counts the real server gives
    (its chat template, its tokenizer), whether the guard knows the tokenizer or calibrates from the replies."""
    asyncio.run(_fill(ollama.url, 4096))  # load the model: the emulator's llama-server counts as Ollama would
    runner = ollama.emulator.runner
    generated = write_sample(tmp_path / "big.jsonl", 1000, seed=11)
    alarms = checked = 0
    for path in (REPO / "data" / "sample" / "requests.jsonl", generated):
        report = scan_openai_batch(path)
        requests = list(iter_openai_batch(report))
        counts, prefix, sample_tokens = asyncio.run(_counts(runner, report, requests))
        if tokenizer == "exact":
            ratio = sum(r.user_chars for r in requests[:20]) / sum(sample_tokens)
            guard = TruncationGuard(prefix, ratio, exact=True)
        else:
            guard = TruncationGuard({}, None, exact=False)
        for request, count in zip(requests, counts, strict=True):
            alarms += guard.check(request, ChatResult("", "stop", count, None, 1, 0.0)) is not None
            checked += 1
    assert checked == 1016 and alarms == 0


async def _counts(runner, report, requests):
    async with get_backend("openai", runner.url, options=BackendOptions(api_key=runner.api_key)) as llama:
        counts = []
        for request in requests:
            prompt = await llama.http.request("POST", "/apply-template", {"messages": request.body["messages"]})
            counts.append(len(await llama.tokenize(prompt["prompt"])))
        prefix = {key: len(await llama.tokenize(text)) for key, text in report.prefix_texts.items()}
        sample = [len(await llama.tokenize(r.body["messages"][-1]["content"])) for r in requests[:20]]
        return counts, prefix, sample


def test_an_ollama_that_counts_only_uncached_prompt_tokens_raises_no_false_alarm(tmp_path):
    """Ollama v0.30-v0.32 left the prefix-cache hits out of `prompt_eval_count` (and said nothing of them): every
    request after the first served its system prompt from the cache and looked cut. The version is read, the plan
    says so, and the guard compares like with like: 16 requests sharing a system prompt, no false alarm."""
    emulator = OllamaEmulator(server_version="0.31.2", counts_cached_prompt=False, reports_cached_count=False)
    with RunningEmulator(emulator) as running:
        sample = small_batch(tmp_path / "in.jsonl", 16)
        result = kvbatch("run", str(sample), "--run", "old", "--backend", "ollama", "--url", running.url, "--model",
                         MODEL, "--no-report", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "data" / "runs" / "old"
    assert not result_lines(run_dir, "errors.jsonl")
    assert len(result_lines(run_dir)) == len(input_ids(sample))
    assert "Ollama 0.31.2 counts only the prompt tokens it evaluates anew" in result.stdout
    served = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m["prompt_tokens"] for m in served) > 3 * min(m["prompt_tokens"] for m in served)  # cache hits


def test_a_cut_prompt_is_still_caught_on_an_ollama_that_counts_only_uncached_tokens(tmp_path):
    emulator = OllamaEmulator(honour_truncate=False, server_version="0.32.0", counts_cached_prompt=False,
                              reports_cached_count=False)  # fmt: skip
    with RunningEmulator(emulator) as running:
        batch = small_batch(tmp_path / "in.jsonl", 4)
        long_request = replace_user_message(batch, 1, "Experience: " + "built a billing pipeline. " * 400)
        result = kvbatch("run", str(batch), "--run", "cut", "--backend", "ollama", "--url", running.url, "--model",
                         MODEL, "--no-report", "--no-progress", "--slot-ctx", "1536", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    errors = result_lines(tmp_path / "data" / "runs" / "cut", "errors.jsonl")
    assert [e["custom_id"] for e in errors] == [long_request["custom_id"]]
    assert errors[0]["error"]["code"] == "TruncatedPromptError"


def test_measuring_through_ollama_sizes_each_fill_by_the_servers_own_count(tmp_path):
    """A server whose tokenizer counts the fill's text as twice as many tokens as words (it died with HTTP 400
    "the input length exceeds the context length" when fills were one token a word): every fill is sized from the
    server's own count, and the measurement file records the count it used."""
    with RunningEmulator(OllamaEmulator(tokens_per_word=2.0)) as running:
        measured = kvbatch("measure", "--backend", "ollama", "--url", running.url, "--model", MODEL, "--only",
                           "kv_growth", "--contexts", "2048,8192", "--repeats", "1", "--fill-context", "1024",
                           cwd=tmp_path)  # fmt: skip
        served = [len(r["prompt"].split()) for r in running.emulator.received if r.get("prompt")]
    assert measured.returncode == 0, measured.stdout + measured.stderr
    measurement = load_measurement(tmp_path / "data" / "measurements" / "ollama__gemma3-270m__f16-f16.json")
    assert abs(measurement.server_flags["fill_tokens_per_word"] - 2.0) < 0.05, measurement.server_flags
    assert measurement.in_use_context_tokens == 1024 and measurement.kv_bytes_per_token
    assert max(served) < 1024  # no fill was sent longer than the context, in words, once the count was known


def test_ollamas_slots_and_cache_type_are_the_servers_not_kvbatchs_environment(tmp_path):
    """Ollama runs as a service with OLLAMA_NUM_PARALLEL=2 (f16), while kvbatch's own environment says 4 and q4_0:
    the settings are inferred from the server's /api/ps sizes at two num_ctx values, the plan says so, and the
    run uses the server's 2 slots."""
    with RunningEmulator(OllamaEmulator(parallel=2)) as running:
        batch = small_batch(tmp_path / "in.jsonl", 8)
        result = kvbatch("run", str(batch), "--backend", "ollama", "--url", running.url, "--model", MODEL,
                         "--no-report", "--no-progress", "--memory-budget", "2GiB", cwd=tmp_path,
                         env={"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_KV_CACHE_TYPE": "q4_0"})  # fmt: skip
        loads = list(running.emulator.loads)
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads((tmp_path / "data" / "runs" / "in" / "plan.json").read_text())
    assert plan["parallel_slots"] == 2 and plan["kv_cache_type"].startswith("f16"), plan
    assert "2 slot(s) inferred" in plan["limits_source"] and "cache f16 inferred" in plan["limits_source"], plan
    assert loads[:2] == [2048, 8192], loads  # the two sizes compared, then the planned context


def test_an_out_of_memory_through_ollama_returns_a_halved_num_ctx_that_the_next_request_carries(ollama):
    """Ollama's runner ran out of memory: the supervisor returns a new layout with half the per-slot context (in its
    recovery, the event), the backend sends it as the next request's num_ctx, and the plan's layout is as planned."""
    from kvbatch.errors import OutOfMemoryError
    from kvbatch.serve.layout import SlotLayout
    from kvbatch.serve.supervisor import OllamaSupervisor

    planned = SlotLayout(1, 8192)
    backend = get_backend("ollama", ollama.url, model=MODEL, layout=planned)
    supervisor = OllamaSupervisor(backend, planned, min_slot_context=2048)

    async def go():
        recovery = await supervisor.recover(OutOfMemoryError("model requires more system memory"))
        assert supervisor.layout == recovery.layout
        await backend.chat({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2})
        again = await supervisor.recover(OutOfMemoryError("model requires more system memory"))
        await supervisor.close()
        return recovery, again

    recovery, again = asyncio.run(go())
    assert recovery.out_of_memory and recovery.action == "num_ctx lowered to 4096"
    assert recovery.layout == SlotLayout(1, 4096) and planned == SlotLayout(1, 8192)
    assert ollama.emulator.received[-1]["options"]["num_ctx"] == 4096
    assert again.layout == supervisor.layout == SlotLayout(1, 2048)  # never below what the requests need
