"""The batch executor on the real embedded server: exactly-once resume after kill -9, recovery from a killed
server and from a context too large for a memory cap, per-request errors, and refused resumes."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import time

import psutil
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

COMMON = ("--no-report", "--no-progress", "--concurrency", "1")


def test_kill_9_at_random_points_then_resume_gives_each_result_exactly_once(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 40)
    run_dir = tmp_path / "data" / "runs" / "kill"
    rng = random.Random(20261129)
    kills = 0
    while kills < 6:
        done_before = len(result_lines(run_dir))
        process = start_kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, cwd=tmp_path)
        wait_for_results(run_dir, done_before + rng.randint(1, 4), process)
        time.sleep(rng.uniform(0, 0.4))  # land anywhere: mid-request, mid-write, between requests
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    assert kills >= 5
    finished = kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, cwd=tmp_path)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    ids = [line["custom_id"] for line in result_lines(run_dir)]
    duplicates = [cid for cid, n in collections.Counter(ids).items() if n > 1]
    assert not duplicates
    assert sorted(ids) == sorted(input_ids(batch))
    assert not (run_dir / "errors.jsonl").exists() or not result_lines(run_dir, "errors.jsonl")
    again = kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, cwd=tmp_path)
    assert "all 40 requests are already done" in again.stdout


def test_killed_server_mid_batch_is_restarted_and_the_run_completes(tmp_path):
    """Run in asyncio's debug mode, which logs every callback that holds the event loop for over 100 ms: the
    recovery (the server's log read, its stop and restart) and the journal's fsyncs must not block it."""
    batch = small_batch(tmp_path / "in.jsonl", 16)
    run_dir = tmp_path / "data" / "runs" / "crash"
    process = start_kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, cwd=tmp_path,
                            env={"PYTHONASYNCIODEBUG": "1"})  # fmt: skip
    wait_for_results(run_dir, 4, process)
    servers = [p for p in psutil.Process(process.pid).children(recursive=True) if "llama-server" in p.name()]
    assert len(servers) == 1
    os.kill(servers[0].pid, signal.SIGKILL)
    out, _ = process.communicate(timeout=WAIT_CEILING_S)
    assert process.returncode == 0, out
    assert sorted(r["custom_id"] for r in result_lines(run_dir)) == sorted(input_ids(batch))
    events = result_lines(run_dir, "events.jsonl")
    recoveries = [e for e in events if e["event"] == "recovery"]
    assert recoveries and recoveries[0]["action"] == "restarted the embedded server"
    slow = [line for line in out.splitlines() if re.search(r"Executing .* took \d", line)]
    assert not slow, "callbacks that blocked the event loop for over 100 ms:\n" + "\n".join(slow)


def test_context_too_large_for_the_memory_cap_backs_off_and_completes(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 4)
    run_dir = tmp_path / "data" / "runs" / "cap"
    result = kvbatch(
        "run",
        str(batch),
        "--run",
        str(run_dir),
        *COMMON,
        "--slot-ctx",
        "65536",
        "--swa-full",
        "--memory-cap",
        "1200MiB",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result_lines(run_dir)) == 4
    events = result_lines(run_dir, "events.jsonl")
    backoffs = [e for e in events if e["event"] == "start_backoff"]
    assert backoffs and backoffs[0]["out_of_memory"]
    assert "insufficient memory" in backoffs[0]["cause"] or "allocate" in backoffs[0]["cause"]
    assert backoffs[0]["action"] == "restarted with 1 slot(s) x 32768 tokens"
    # one owner: the back-off changed the plan's layout, which the server, the summary and the executor all read
    assert json.loads((run_dir / "summary.json").read_text())["slot_context_tokens"] == 32768
    assert "n_ctx_slot = 32768" in (run_dir / "server.log").read_text()
    assert json.loads((run_dir / "plan.json").read_text())["slot_context_tokens"] == 65536  # what was planned


def test_over_long_request_fails_alone_into_errors_jsonl(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 5)
    long_request = replace_user_message(batch, 2, "word " * 3000)
    run_dir = tmp_path / "data" / "runs" / "long"
    result = kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, "--slot-ctx", "1024", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # done, one failed for good
    assert "more than the 1024 asked for" in result.stdout
    errors = result_lines(run_dir, "errors.jsonl")
    assert [e["custom_id"] for e in errors] == [long_request["custom_id"]]
    assert errors[0]["error"]["code"] == "ContextOverflowError"
    assert "exceeds the available context size" in errors[0]["error"]["message"]
    assert errors[0]["attempts"] == 1
    assert len(result_lines(run_dir)) == 4


def test_resume_with_a_changed_fingerprint_is_refused(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 2)
    run_dir = tmp_path / "data" / "runs" / "fp"
    first = kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, "--max-tokens", "4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, "--max-tokens", "8", cwd=tmp_path)
    assert second.returncode == 2
    assert "different fingerprint" in second.stderr
    assert "generation: was {'overrides': {'max_tokens': 4}" in second.stderr
    assert "Traceback" not in second.stderr
    assert len(result_lines(run_dir)) == 2


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 12)
    run_dir = tmp_path / "data" / "runs" / "int"
    process = start_kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, cwd=tmp_path)
    wait_for_results(run_dir, 3, process)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=WAIT_CEILING_S)
    assert process.returncode == 130, out
    assert "Every finished request is saved; run the same command to resume." in out
    assert "Traceback" not in out
    assert all(line.endswith("\n") for line in (run_dir / "results.jsonl").read_text().splitlines(keepends=True))
    finished = kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    ids = [r["custom_id"] for r in result_lines(run_dir)]
    assert sorted(ids) == sorted(input_ids(batch))


def test_conversation_mode_answers_every_request_in_growing_conversations(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 8)
    run_dir = tmp_path / "data" / "runs" / "conv"
    result = kvbatch("run", str(batch), "--run", str(run_dir), *COMMON, "--mode", "conversation", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "conversation chunk:" in result.stdout
    assert sorted(r["custom_id"] for r in result_lines(run_dir)) == sorted(input_ids(batch))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # one conversation: each turn's prompt holds the earlier turns, served from the cache
    prompts = [m["prompt_tokens"] for m in metrics]
    assert prompts == sorted(prompts) and prompts[-1] > prompts[0] + 7 * 40
    assert all(m["cached_tokens"] >= prompts[0] - 50 for m in metrics[1:])


def test_memory_above_the_threshold_ends_conversations_early_and_is_logged(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 4)
    run_dir = tmp_path / "data" / "runs" / "mem"
    result = kvbatch(
        "run",
        str(batch),
        "--run",
        str(run_dir),
        *COMMON,
        "--mode",
        "conversation",
        "--memory-threshold",
        "1MiB",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result_lines(run_dir)) == 4
    events = result_lines(run_dir, "events.jsonl")
    assert [e["event"] for e in events].count("memory_high") == 1
    ended = [e for e in events if e["event"] == "chunk_end" and e["reason"] == "memory threshold"]
    assert len(ended) == 3  # every conversation ended after one turn while memory stayed above 1 MiB


def test_after_an_out_of_memory_back_off_only_the_remaining_slot_ids_are_leased(tmp_path):
    """4 slots, an out-of-memory kill mid-run (kill -9 as the kernel's OOM killer would, and the cgroup's count
    rising): the server comes back with 2 slots, no request names slot 2 or 3 again, and both remaining slots
    serve (each worker leases a free id for every attempt, instead of keeping its own)."""
    import asyncio

    from kvbatch.batch.inputs.openai_batch import iter_openai_batch, scan_openai_batch
    from kvbatch.batch.run.execution.executor import Executor, RunOptions
    from kvbatch.batch.run.journal import Fingerprint, Journal
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.serve.config import ServerConfig
    from kvbatch.serve.layout import SlotLayout
    from kvbatch.serve.supervisor import EmbeddedSupervisor

    batch = small_batch(tmp_path / "in.jsonl", 40)
    report = scan_openai_batch(batch)
    folder = RunFolder(tmp_path / "run")
    journal = Journal.open(folder, Fingerprint(input_hash=report.input_hash, model="m", system_prompt_hash="",
                                               generation={}, mode="independent"))  # fmt: skip
    events = tmp_path / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")
    layout = SlotLayout(4, 1024)
    supervisor = EmbeddedSupervisor(ServerConfig(), layout, min_slot_context=512, log_path=tmp_path / "server.log",
                                    oom_counter_files=[events])  # fmt: skip
    executor = Executor(journal, [supervisor], RunOptions(concurrency=4, progress=False), folder=folder,
                        total=report.request_count)  # fmt: skip

    async def kill_for_memory_mid_run() -> None:
        while executor.stats.completed < 8:
            await asyncio.sleep(0.05)
        events.write_text("oom 1\noom_kill 1\n")
        await asyncio.to_thread(supervisor.server.kill)

    async def go() -> None:
        await supervisor.start()
        killer = asyncio.create_task(kill_for_memory_mid_run())
        await executor.run(iter_openai_batch(report))
        await killer
        await supervisor.close()

    asyncio.run(go())
    journal.close()
    assert supervisor.layout.slots == 2 and layout.slots == 4  # replaced, not changed in place
    assert sorted(r["custom_id"] for r in result_lines(folder.path)) == sorted(input_ids(batch))
    recovery = next(e for e in result_lines(folder.path, "events.jsonl") if e["event"] == "recovery")
    assert recovery["out_of_memory"] and "kill count rose from 0 to 1" in recovery["oom_evidence"]
    metrics = result_lines(folder.path, "metrics.jsonl")
    after = [m["slot"] for m in metrics if m["t_done_unix_s"] > recovery["t_unix_s"]]
    assert after and set(after) == {0, 1}, after  # no id 2 or 3 is sent; both remaining slots stay busy
