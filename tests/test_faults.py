"""Nothing lost, nothing burned: external servers, transient faults, a poison request, one writer per run folder,
secrets kept off disk, and the 1,000-request stress test killed three times."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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
from fault_server import Faults, RunningFaultServer
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.oomkill import OomWatch, cgroup_counter_files, oom_kill_count
from kvbatch.serve.server import EmbeddedServer, free_port
from stress import stress_run

QUIET = ("--no-report", "--no-progress")


def test_the_stress_test_1000_requests_three_kills_exactly_once(tmp_path):
    outcome = stress_run(1000, 3, tmp_path)
    assert outcome.duplicates == 0 and outcome.lost == 0
    assert outcome.failed_ids == [outcome.poison_id]
    assert outcome.results == 999
    injected = {k: v for k, v in outcome.faults.items() if k not in ("requests", "answered")}
    assert injected.get("503") and injected.get("dropped connection") and injected.get("not JSON")
    assert 2 <= injected.get("crash (poison)", 0) <= 4  # twice among others, then alone until convicted (twice)
    error = result_lines(tmp_path / "data" / "runs" / "stress", "errors.jsonl")[0]
    assert "the request that takes it down" in error["error"]["message"]


def test_a_server_that_refuses_slot_ids_gets_requests_without_them(tmp_path):
    with RunningFaultServer(free_port(), Faults(refuse_slot_ids=True), keep_bodies=True) as server:
        batch = small_batch(tmp_path / "in.jsonl", 20)
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--concurrency", "4", cwd=tmp_path)
        counts = dict(server.server.counts)
        bodies = server.server.bodies
    assert result.returncode == 0, result.stderr
    assert len(result_lines(tmp_path / "data" / "runs" / "in")) == 20
    assert counts["refused slot id"] <= 4  # one per worker at most, then never again
    assert counts["requests"] <= 20 + 4 and sum("id_slot" in b for b in bodies) == counts["refused slot id"]


def test_a_rejected_key_stops_the_run_at_once_and_burns_nothing(tmp_path):
    with RunningFaultServer(free_port(), Faults(require_key="right")) as server:
        batch = small_batch(tmp_path / "in.jsonl", 10)
        env = {**os.environ, "KVBATCH_API_KEY": "wrong"}
        result = subprocess.run([sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--url", server.url, *QUIET],
                                cwd=tmp_path, capture_output=True, text=True, env=env)  # fmt: skip
        seen = server.server.counts["401"]
    assert result.returncode == 2
    assert "HTTP 401" in result.stderr and "check the API key" in result.stderr and "Traceback" not in result.stderr
    run = tmp_path / "data" / "runs" / "in"
    assert not result_lines(run, "errors.jsonl") and not result_lines(run)
    assert seen <= 2  # stopped at once
    again = subprocess.run([sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--url", "http://127.0.0.1:9",
                            "--run", "nobody", *QUIET, "--max-wait", "1"], cwd=tmp_path, capture_output=True,
                           text=True)  # fmt: skip
    assert "did not become healthy within 1 s" in again.stderr and again.returncode == 3  # down: run it again


def test_a_running_llama_servers_limits_are_discovered(tmp_path):
    with EmbeddedServer(ServerConfig(context_tokens=3 * 2048, parallel_slots=3)) as server:
        batch = small_batch(tmp_path / "in.jsonl", 6)
        env = {**os.environ, "KVBATCH_API_KEY": server.api_key}
        result = subprocess.run([sys.executable, "-m", "kvbatch.cli", "plan", str(batch), "--url", server.url],
                                cwd=tmp_path, capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 slot(s) x 2048 tokens" in result.stdout
    assert "llama-server: slots 3 [/props total_slots], context per slot 2048 [/props n_ctx]" in result.stdout


def test_transient_faults_are_waited_out_and_a_long_outage_stops_without_failing_anything(tmp_path):
    with RunningFaultServer(free_port(), Faults(p503=0.3, p_not_json=0.1, seed=4)) as server:
        batch = small_batch(tmp_path / "in.jsonl", 40)
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--concurrency", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "data" / "runs" / "in"
    assert len(result_lines(run)) == 40 and not result_lines(run, "errors.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["retries"] >= 5 and summary["waited_s"] > 0
    with RunningFaultServer(free_port(), Faults(p503=1.0)) as server:
        batch = small_batch(tmp_path / "down.jsonl", 5)
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--max-wait", "3", cwd=tmp_path)
    assert result.returncode == 3  # stopped with nothing lost: the same command again, later
    assert "kept failing for 3 s (--max-wait)" in result.stderr and "run the same command again" in result.stderr
    assert not result_lines(tmp_path / "data" / "runs" / "down", "errors.jsonl")


def test_retry_failed_sends_the_failed_requests_again(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 6)
    long_one = replace_user_message(batch, 2, "TOO-LONG " + "x" * 50)
    run = tmp_path / "data" / "runs" / "in"
    with RunningFaultServer(free_port(), Faults(refuse_marker="TOO-LONG")) as server:
        first = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # done, one failed for good
    assert [e["custom_id"] for e in result_lines(run, "errors.jsonl")] == [long_one["custom_id"]]
    with RunningFaultServer(free_port(), Faults()) as server:  # the server's context was raised meanwhile
        unchanged = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
        again = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--retry-failed", cwd=tmp_path)
    assert "all 6 requests are already done" in unchanged.stdout
    assert again.returncode == 0, again.stderr
    assert "sending again 1 request(s) from errors.jsonl" in again.stdout
    assert sorted(r["custom_id"] for r in result_lines(run)) == sorted(input_ids(batch))
    assert not result_lines(run, "errors.jsonl")
    history = result_lines(run, "errors-history.jsonl")
    assert [h["custom_id"] for h in history] == [long_one["custom_id"]] and history[0]["error"]["code"] == (
        "ContextOverflowError"
    )


def test_secrets_and_url_credentials_never_reach_the_run_folder(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 4)
    with RunningFaultServer(free_port(), Faults(), keep_bodies=True) as server:
        url = server.url.replace("http://", "http://alice:s3cret-pass@")
        result = subprocess.run([sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--url", url, "--no-progress",
                                 "--run", "with-password"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        bodies = server.server.bodies
    assert result.returncode == 0, result.stderr
    with RunningFaultServer(free_port(), Faults(require_key="sk-very-secret-key")) as server:
        env = {**os.environ, "KVBATCH_API_KEY": "sk-very-secret-key"}
        keyed = subprocess.run([sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--url", server.url,
                                "--no-progress", "--run", "with-key"], cwd=tmp_path, capture_output=True, text=True,
                               env=env)  # fmt: skip
    assert keyed.returncode == 0, keyed.stderr
    everything = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    everything += result.stdout + result.stderr + keyed.stdout + keyed.stderr
    for secret in ("s3cret-pass", "alice:", "sk-very-secret-key"):
        assert secret not in everything
    assert all(body["max_tokens"] == 6 for body in bodies)  # every request carries a max_tokens


def test_default_max_tokens_is_sent_when_a_request_sets_none(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 3)
    lines = []
    for line in batch.read_text().splitlines():
        record = json.loads(line)
        record["body"].pop("max_tokens")
        lines.append(json.dumps(record))
    batch.write_text("\n".join(lines) + "\n")
    with RunningFaultServer(free_port(), Faults(), keep_bodies=True) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
        bodies = server.server.bodies
    assert result.returncode == 0, result.stderr
    assert [body["max_tokens"] for body in bodies] == [512, 512, 512]


def test_a_second_run_on_the_same_folder_exits_2_naming_the_first(tmp_path):
    with RunningFaultServer(free_port(), Faults(service_s=0.2, slots=1)) as server:
        batch = small_batch(tmp_path / "in.jsonl", 6000)  # 20 minutes of work: the first is still running
        first = start_kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
        run = tmp_path / "data" / "runs" / "in"
        wait_for_results(run, 1, first)
        second = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
        assert first.poll() is None, "the first run must still hold the folder while the second starts"
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=WAIT_CEILING_S)
    assert second.returncode == 2
    assert f"is being written by kvbatch process {first.pid}" in second.stderr


def test_a_plan_error_leaves_no_run_behind(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 3)
    result = kvbatch("run", str(batch), *QUIET, "--memory-budget", "1MiB", cwd=tmp_path)
    assert result.returncode == 2 and "fit one slot" in result.stderr
    assert not (tmp_path / "data" / "runs" / "in" / "run.json").exists()
    with RunningFaultServer(free_port(), Faults()) as server:
        corrected = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
    assert corrected.returncode == 0, corrected.stderr


def test_an_input_edited_during_a_run_stops_it_cleanly(tmp_path):
    with RunningFaultServer(free_port(), Faults(service_s=0.1, slots=1)) as server:
        batch = small_batch(tmp_path / "in.jsonl", 100)
        process = start_kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
        run = tmp_path / "data" / "runs" / "in"
        wait_for_results(run, 3, process)
        with open(batch, "a") as handle:
            handle.write(batch.read_text().splitlines()[0].replace("candidate-000000", "late") + "\n")
        out, _ = process.communicate(timeout=WAIT_CEILING_S)
    assert process.returncode == 2, out
    assert "changed while the run was reading it; every finished request is saved" in out
    ids = [r["custom_id"] for r in result_lines(run)]
    assert len(ids) == len(set(ids)) and "Traceback" not in out


def test_a_kernel_oom_kill_is_read_from_the_process_own_cgroup_v1_or_v2(tmp_path):
    v2 = tmp_path / "app.slice" / "memory.events"
    v2.parent.mkdir()
    v2.write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n")
    v1 = tmp_path / "memory" / "process_api" / "abc" / "memory.oom_control"
    v1.parent.mkdir(parents=True)
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert cgroup_counter_files("0::/app.slice\n", root=tmp_path) == [v2]  # a host's v2: the process's own group
    assert cgroup_counter_files("4:memory:/process_api/abc\n0::/\n", root=tmp_path) == [v1]  # v1, as here
    assert oom_kill_count([v2]) == 2 and oom_kill_count([v1]) == 5 and oom_kill_count([tmp_path / "missing"]) is None
    watch = OomWatch.now([v2], kmsg=tmp_path / "no-kernel-log")  # this machine's kernel log is not the test's
    assert watch.evidence(12345, -9) is None  # a plain kill -9: nothing counted
    v2.write_text("oom 4\noom_kill 3\n")
    assert "out-of-memory kill count rose from 2 to 3" in watch.evidence(12345, -9)
    assert watch.evidence(12345, 1) is None  # not a SIGKILL: not the OOM killer


def test_a_kernel_oom_kill_restarts_the_server_smaller(tmp_path):
    """The kernel's OOM killer leaves an empty log and exit -9; the cgroup's oom_kill count tells it from a plain
    kill, and the server comes back with fewer slots."""
    import asyncio

    from kvbatch.errors import ServerGoneError
    from kvbatch.serve.config import ServerConfig
    from kvbatch.serve.layout import SlotLayout
    from kvbatch.serve.supervisor import EmbeddedSupervisor

    events = tmp_path / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")
    layout = SlotLayout(2, 1024)
    supervisor = EmbeddedSupervisor(ServerConfig(), layout, min_slot_context=512, log_path=tmp_path / "server.log",
                                    oom_counter_files=[events])  # fmt: skip

    async def go():
        await supervisor.start()
        supervisor.server.kill()  # as the OOM killer would, then the cgroup counts it
        events.write_text("oom 1\noom_kill 1\n")
        recovery = await supervisor.recover(ServerGoneError("Server disconnected"))
        await supervisor.close()
        return recovery

    recovery = asyncio.run(go())
    assert recovery.out_of_memory and recovery.action == "restarted with 1 slot(s) x 1024 tokens"
    assert "out-of-memory kill count rose from 0 to 1" in recovery.oom_evidence
    assert supervisor.layout.slots == 1 and recovery.layout == supervisor.layout  # the new layout, returned


def test_an_out_of_memory_halving_is_not_undone_by_a_later_phase(tmp_path):
    import asyncio

    from kvbatch.batch.run.execution.endpoint import Endpoint
    from kvbatch.batch.run.execution.recorder import Recorder
    from kvbatch.batch.run.execution.stats import RunStats
    from kvbatch.batch.run.journal import Fingerprint, Journal
    from kvbatch.batch.run.progress import Progress
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.errors import OutOfMemoryError
    from kvbatch.serve.backends import get_backend
    from kvbatch.serve.layout import SlotLayout
    from kvbatch.serve.supervisor import ExternalSupervisor, Recovery

    class OutOfMemoryOnce(ExternalSupervisor):
        async def recover(self, cause):
            return Recovery(str(cause), "waited for health", 0.0, True)

    folder = RunFolder(tmp_path)
    journal = Journal.open(folder, Fingerprint(input_hash="sha256:0", model="m", system_prompt_hash="",
                                               generation={}, mode="independent"))  # fmt: skip
    recorder = Recorder(journal, folder, RunStats(), Progress(None, enabled=False), prefix_tokens={})

    async def go():
        supervisor = OutOfMemoryOnce(get_backend("openai", "http://127.0.0.1:9"), SlotLayout(8, 4096))
        endpoint = Endpoint(supervisor, label="e", recorder=recorder, pooled=False)
        assert await endpoint.set_in_flight(8) == 8
        await endpoint.recover(OutOfMemoryError("out of memory"), endpoint.generation)
        assert endpoint.capacity.limit == 4
        assert await endpoint.set_in_flight(8) == 4  # the next phase asks for 8 again, and gets 4
        await supervisor.close()

    asyncio.run(go())
    recorder.close()
    journal.close()


SLOW = "SLOW-REQUEST"


def test_a_request_that_times_out_while_others_are_answered_fails_alone_and_is_no_crash(tmp_path):
    """The server answers 59 requests at once and one always too late: that one fails for good as timed out
    (four times, after the limit), nothing else is charged, the server is never treated as crashed."""
    batch = small_batch(tmp_path / "in.jsonl", 60)
    slow = replace_user_message(batch, 30, f"{SLOW} please")
    with RunningFaultServer(free_port(), Faults(slow_marker=SLOW, slow_s=8.0)) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--request-timeout", "3",
                         "--concurrency", "4", cwd=tmp_path)  # fmt: skip
        sent_slow = server.server.counts["slow"]
    assert result.returncode == 1, result.stdout + result.stderr  # done, one failed for good
    run = tmp_path / "data" / "runs" / "in"
    errors = result_lines(run, "errors.jsonl")
    assert [e["custom_id"] for e in errors] == [slow["custom_id"]]
    message = errors[0]["error"]["message"]
    assert "timed out 4 times after 3 s while the server answered other requests" in message, message
    assert "takes it down" not in message and sent_slow == errors[0]["attempts"] == 4
    assert len(result_lines(run)) == 59
    events = result_lines(run, "events.jsonl")
    assert not [e for e in events if e["event"] == "recovery"]  # a timeout is not a crash: nothing restarted
    decisions = [e for e in events if e["event"] == "failure"]
    assert decisions and all(e["custom_id"] == slow["custom_id"] and e["error"] == "RequestTimeoutError"
                             for e in decisions)  # fmt: skip


def test_a_wedged_server_stops_the_run_and_charges_no_request(tmp_path):
    """500 to every request after the first 5 while /health says ok: the fault is the server's. The run stops with
    exit 3 and one sentence, nothing in errors.jsonl, after a handful of attempts (not the whole input)."""
    batch = small_batch(tmp_path / "in.jsonl", 300)
    with RunningFaultServer(free_port(), Faults(wedge_after=5)) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--max-wait", "3", cwd=tmp_path)
        sent = server.server.counts["requests"]
    assert result.returncode == 3, result.stdout + result.stderr
    run = tmp_path / "data" / "runs" / "in"
    assert not result_lines(run, "errors.jsonl")
    assert len(result_lines(run)) == 5
    stderr = result.stderr
    assert "stopped serving" in stderr and "different request(s) failed" in stderr and "server errors" in stderr
    assert "EngineCore encountered an issue" in stderr and "Nothing was charged to those requests" in stderr
    assert "Traceback" not in stderr
    assert sent < 5 + 60, sent  # the breaker and a few probes, not 1,185 requests
    summary = json.loads((run / "summary.json").read_text())  # written after the stop, for what was done
    assert summary["completed_total"] == 5 and summary["failed_total"] == 0
    events = result_lines(run, "events.jsonl")
    assert any(e["event"] == "failure" and e["action"] == "take the server out and probe it" for e in events)
    assert any(e["event"] == "stopped" for e in events)


def test_a_request_the_server_always_fails_fails_alone_while_others_succeed(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 40)
    bad = replace_user_message(batch, 7, "BAD-REQUEST here")
    with RunningFaultServer(free_port(), Faults(fail_marker="BAD-REQUEST")) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--concurrency", "1", cwd=tmp_path)
        failed_500 = server.server.counts["500"]
    assert result.returncode == 1, result.stdout + result.stderr
    errors = result_lines(tmp_path / "data" / "runs" / "in", "errors.jsonl")
    assert [e["custom_id"] for e in errors] == [bad["custom_id"]]
    # its first failure, with nothing served meanwhile, is not charged; the next four are (others were served)
    assert failed_500 == errors[0]["attempts"] == 5
    assert "failed 4 times for this request while it answered others" in errors[0]["error"]["message"]


def test_in_a_pool_a_wedged_endpoint_is_taken_out_while_the_others_carry_on(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 200)
    with RunningFaultServer(free_port(), Faults(service_s=0.01, slots=2)) as good, RunningFaultServer(
        free_port(), Faults(service_s=0.01, slots=2, wedge_after=3)
    ) as wedged:  # fmt: skip
        result = kvbatch("run", str(batch), "--url", good.url, "--url", wedged.url, *QUIET, "--max-wait", "5",
                         cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "data" / "runs" / "in"
    assert len(result_lines(run)) == 200 and not result_lines(run, "errors.jsonl")
    events = result_lines(run, "events.jsonl")
    assert any(e["event"] == "endpoint_out" and e["endpoint"] == "external-1" for e in events)


def test_exit_codes_a_script_can_act_on():
    from kvbatch.errors import (
        AuthError,
        RequestTimeoutError,
        ServerFaultError,
        ServerGoneError,
        UserInputError,
        exit_code,
    )

    assert exit_code(UserInputError("bad line")) == 2 and exit_code(AuthError("401")) == 2
    assert exit_code(ServerGoneError("down")) == 3 and exit_code(ServerFaultError("500")) == 3
    assert exit_code(RequestTimeoutError("slow")) == 3
    help_text = kvbatch("run", "--help", cwd=Path.cwd()).stdout
    assert "3    stopped with nothing lost" in help_text and "130  interrupted" in help_text


def test_an_allocation_failure_is_out_of_memory_whatever_the_status():
    from kvbatch.errors import OutOfMemoryError, classify_http_error

    # llama-server answers 400 when serving a request threw std::bad_alloc (seen under an address-space cap)
    assert isinstance(classify_http_error(400, "std::bad_alloc"), OutOfMemoryError)
    assert isinstance(classify_http_error(500, "CUDA error: out of memory"), OutOfMemoryError)
    assert not isinstance(classify_http_error(400, "invalid 'messages'"), OutOfMemoryError)


def test_the_kernel_logs_own_line_names_the_kill_and_an_older_one_does_not(tmp_path):
    from kvbatch.serve.oomkill import kernel_log_names

    kmsg = tmp_path / "kmsg"
    kmsg.write_text("3,812,5000000,-;Out of memory: Killed process 4242 (llama-server) total-vm:1000kB\n")
    assert kernel_log_names(4242, kmsg, since_us=0).startswith("Out of memory: Killed process 4242")
    assert kernel_log_names(4242, kmsg, since_us=6_000_000) is None  # before this server started: another 4242
    assert kernel_log_names(4243, kmsg) is None


def test_a_server_that_answers_probes_but_no_real_request_charges_nothing():
    """A wedged server may answer the one-token probe and fail every real request: re-admitting it after a probe
    must not make the requests that failed before look like their own fault."""
    from kvbatch.batch.run.execution.policy import Action, FailurePolicy
    from kvbatch.errors import ServerFaultError

    policy = FailurePolicy()
    for _ in range(5):  # take out, probe answered, re-admitted, the same requests fail again
        actions = [policy.decide("e", f"r{i}", ServerFaultError("HTTP 500"), sent_mark=0).action for i in range(4)]
        assert actions[-1] is Action.BREAK and all(a is Action.RETRY_LATER for a in actions[:-1])
        policy.probe_served("e")
    assert all(policy.requests[f"r{i}"].charged == 0 for i in range(4))
    assert policy.breaker("e").failing_since is not None  # --max-wait counts through the re-admissions
    policy.succeeded("e", "r9")  # a real success: the next failure of r0 is its own fault
    assert policy.decide("e", "r0", ServerFaultError("HTTP 500"), sent_mark=0).charged


def _trials(run: Path) -> tuple[list[int], int]:
    """The in-flight counts the run tried, in order, and the one it kept."""
    events = result_lines(run, "events.jsonl")
    tried = [e["in_flight"] for e in events if e["event"] == "concurrency_trial"]
    chosen = [e["in_flight"] for e in events if e["event"] == "concurrency_chosen"]
    assert len(chosen) == 1, events
    return tried, chosen[0]


def test_on_a_server_that_does_not_say_its_slots_the_run_measures_how_many_in_flight(tmp_path):
    """A server without /props (vLLM's continuous batching) that runs 64 requests at once, each in 0.5 s: with no
    --concurrency the run climbs past 16 while the rate rises, tries beyond 64, and keeps at least 64 in flight
    (it once ran such a server one request at a time)."""
    batch = small_batch(tmp_path / "in.jsonl", 1600)
    with RunningFaultServer(free_port(), Faults(llama_server=False, slots=64, service_s=0.5)) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
        served = server.server.counts["requests"]
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "data" / "runs" / "in"
    tried, chosen = _trials(run)
    assert tried[:3] == [4, 16, 64] and max(tried) > 64, tried  # from 4: a batching server serves 4 as fast as 1
    assert chosen >= 64, (tried, chosen)
    assert len(result_lines(run)) == 1600 and served == 1600  # the trials' requests are real work, kept
    plan = json.loads((run / "plan.json").read_text())
    assert "measures how many in flight" in json.dumps(plan)


def test_on_a_known_layout_the_plans_own_slot_count_is_tried(tmp_path):
    """A llama-server that says it has 7 slots: the ladder (1, 4, 16, ...) would stop at 4; the plan's 7 is one
    of the counts tried, and kept, since each slot serves one request at a time."""
    batch = small_batch(tmp_path / "in.jsonl", 80)
    with RunningFaultServer(free_port(), Faults(slots=7, service_s=0.5)) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tried, chosen = _trials(tmp_path / "data" / "runs" / "in")
    assert 7 in tried and chosen == 7, (tried, chosen)


def test_when_the_batch_ends_during_a_trial_the_faster_count_measured_is_kept(tmp_path):
    """18 requests on 4 slots that each serve one request in 0.5 s: the trial at 1 finishes, the batch ends during
    the trial at 4 (its quota is 8 once every slot is warm); 4 in flight served about four times as fast, and is
    the count the run reports (it once reported 1)."""
    batch = small_batch(tmp_path / "in.jsonl", 18)
    with RunningFaultServer(free_port(), Faults(slots=4, service_s=0.5)) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    events = result_lines(tmp_path / "data" / "runs" / "in", "events.jsonl")
    rates = {e["in_flight"]: e["requests_per_s"] for e in events if e["event"] == "concurrency_trial"}
    chosen = [e for e in events if e["event"] == "concurrency_chosen"]
    assert list(rates) == [1, 4] and rates[4] > rates[1], rates
    assert [e["in_flight"] for e in chosen] == [4] and "ended during the trial at 4" in chosen[0]["why"], chosen


def test_a_real_kernel_oom_kill_in_the_servers_own_cgroup_is_named_and_the_server_comes_back_smaller(tmp_path):
    """Where the machine lets kvbatch give the server a memory cgroup of its own (cgroup v1 as root, as here and in
    CI), a limit on that group lets the kernel's OOM killer end the server for real in the middle of a request: the
    recovery names the group's kill count, how the server ended and its peak memory, and halves the slots."""
    import asyncio

    from kvbatch.batch.inputs.sample import system_prompt
    from kvbatch.errors import KvbatchError
    from kvbatch.serve.layout import SlotLayout
    from kvbatch.serve.oomkill import _own_memory_cgroups
    from kvbatch.serve.supervisor import EmbeddedSupervisor

    layout = SlotLayout(2, 4096)
    config = ServerConfig(extra_args=["--load-mode", "none"])  # no mmap: the weights in the group's memory
    supervisor = EmbeddedSupervisor(config, layout, min_slot_context=512, log_path=tmp_path / "server.log")
    groups = _own_memory_cgroups(Path("/proc/self/cgroup").read_text(), Path("/sys/fs/cgroup"))
    can_make_one = any(os.access(folder, os.W_OK) for folder, _ in groups)

    async def go():
        await supervisor.start()
        cgroup = supervisor.server.cgroup
        if not can_make_one:  # nowhere to make one: no group is claimed, and the other evidence is used
            assert cgroup is None
            await supervisor.close()
            return None, None
        assert cgroup is not None and str(supervisor.server.pid) in (cgroup.path / "cgroup.procs").read_text()
        # The limit is set 4 MiB above what the server cannot give back (its anonymous memory and mapped files), not
        # above the group's usage: usage counts page cache (the model file read at load, where this group read it
        # first), which the kernel reclaims before it kills, and which once let a CI server answer under the limit.
        stat = dict(line.split() for line in (cgroup.path / "memory.stat").read_text().splitlines())
        held = ("total_rss", "total_mapped_file") if cgroup.version == 1 else ("anon", "file_mapped")
        limit = "memory.limit_in_bytes" if cgroup.version == 1 else "memory.max"
        (cgroup.path / limit).write_text(str(sum(int(stat[key]) for key in held) + 4 * 2**20))
        body = {"messages": [{"role": "user", "content": system_prompt(3000)}], "max_tokens": 4}
        try:
            await supervisor.backend.chat(body, timeout_s=WAIT_CEILING_S)
            raise AssertionError("the server answered under a limit 4 MiB above what it held")
        except KvbatchError as exc:
            error = exc
        path = cgroup.path
        recovery = await supervisor.recover(error)
        await supervisor.close()
        return recovery, path

    recovery, path = asyncio.run(go())
    if recovery is None:
        return
    assert recovery.out_of_memory and recovery.action == "restarted with 1 slot(s) x 4096 tokens", recovery
    assert "the server's own cgroup counted 1 out-of-memory kill(s)" in recovery.oom_evidence, recovery
    assert recovery.server_exit == "was killed by SIGKILL (killed)"
    assert recovery.server_peak_bytes and recovery.server_peak_bytes > 100 * 2**20  # the weights, at least
    assert supervisor.layout.slots == 1 and not path.exists()  # the group goes with its server


def test_a_wedged_embedded_server_is_restarted_when_its_breaker_trips(tmp_path):
    """An embedded server that says it is healthy but fails every request is ours: when the breaker takes it out,
    it is restarted (a new process), then probed with a real chat request and re-admitted."""
    import asyncio

    from kvbatch.batch.run.execution.endpoint import Endpoint
    from kvbatch.batch.run.execution.recorder import Recorder
    from kvbatch.batch.run.execution.stats import RunStats
    from kvbatch.batch.run.journal import Fingerprint, Journal
    from kvbatch.batch.run.progress import Progress
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.errors import ServerFaultError
    from kvbatch.serve.layout import SlotLayout
    from kvbatch.serve.supervisor import EmbeddedSupervisor

    folder = RunFolder(tmp_path)
    journal = Journal.open(folder, Fingerprint(input_hash="sha256:0", model="m", system_prompt_hash="",
                                               generation={}, mode="independent"))  # fmt: skip
    recorder = Recorder(journal, folder, RunStats(), Progress(None, enabled=False), prefix_tokens={})
    supervisor = EmbeddedSupervisor(ServerConfig(), SlotLayout(1, 1024), min_slot_context=512,
                                    log_path=tmp_path / "server.log")  # fmt: skip

    async def go():
        await supervisor.start()
        endpoint = Endpoint(supervisor, label="e", recorder=recorder, pooled=False)
        before = supervisor.pid
        endpoint.trip(ServerFaultError("HTTP 500: EngineCore encountered an issue"), endpoint.generation)
        assert endpoint.out
        await asyncio.wait_for(endpoint.back.wait(), WAIT_CEILING_S)
        after = supervisor.pid
        await endpoint.close()
        return before, after, endpoint.out

    before, after, still_out = asyncio.run(go())
    recorder.close()
    journal.close()
    assert not still_out and before != after  # another process, serving
    events = result_lines(tmp_path, "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds == ["endpoint_out", "recovery", "endpoint_back"], kinds
    assert events[1]["action"] == "restarted the embedded server (it failed every request)"


def test_dropped_connections_are_waited_out_and_charge_no_request_while_others_succeed(tmp_path):
    """A server that drops a third of its connections mid-reply (a proxy, a restart of a worker) but serves the
    rest: every request is done, none fails for good, and no drop is taken for a crash (nothing restarted)."""
    batch = small_batch(tmp_path / "in.jsonl", 60)
    with RunningFaultServer(free_port(), Faults(p_drop=0.33, seed=5)) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--concurrency", "4", cwd=tmp_path)
        dropped = server.server.counts["dropped connection"]
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "data" / "runs" / "in"
    assert sorted(r["custom_id"] for r in result_lines(run)) == sorted(input_ids(batch))
    assert not result_lines(run, "errors.jsonl") and dropped >= 5, dropped
    events = result_lines(run, "events.jsonl")
    assert not [e for e in events if e["event"] == "recovery" and "restarted" in e.get("action", "")]
    failures = [e for e in events if e["event"] == "failure"]
    assert failures and {e["error"] for e in failures} == {"ConnectionDroppedError"}
    assert json.loads((run / "summary.json").read_text())["retries"] >= dropped
