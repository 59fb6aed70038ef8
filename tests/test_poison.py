"""Only the request that takes the server down may fail: its neighbours, in flight with it at every crash, are sent
alone, served, and cleared. The server double crashes on one marked request as a real one does: every open
connection dropped (idle keep-alive ones too), and for a moment every new connection and its health check reset."""

from __future__ import annotations

import collections

import pytest
from batch_helpers import input_ids, kvbatch, replace_user_message, result_lines, small_batch
from fault_server import POISON, Faults, RunningFaultServer
from kvbatch.report.results import load_errors, load_events, solo_turns
from kvbatch.serve.server import free_port

QUIET = ("--no-report", "--no-progress")


def assert_only_the_poison_failed(run, batch, poison_id: str) -> None:
    """Exactly one failure for good, the poison's; every other custom_id once in results.jsonl."""
    errors = result_lines(run, "errors.jsonl")
    assert [e["custom_id"] for e in errors] == [poison_id], [(e["custom_id"], e["error"]) for e in errors]
    assert "the request that takes it down" in errors[0]["error"]["message"]
    done = [r["custom_id"] for r in result_lines(run)]
    assert not [cid for cid, n in collections.Counter(done).items() if n > 1]
    assert sorted(done) == sorted(cid for cid in input_ids(batch) if cid != poison_id)


def assert_solo_turns_tell_why(run, poison_id: str) -> None:
    """The report's table of requests sent alone: the poison convicted by its own solo crashes, the others cleared;
    no crash is charged to two requests."""
    events = load_events(run)
    solos = events[events["event"] == "solo_attempt"]
    crashed = solos[solos["outcome"] == "retry alone"]["server_generation"].tolist() + solos[
        solos["outcome"] == "failed for good"]["server_generation"].tolist()  # fmt: skip
    assert len(crashed) == len(set(crashed)), "a crash was charged to more than one solo request"
    table = solo_turns(events, load_errors(run)).set_index("custom_id")
    assert table.loc[poison_id, "verdict"] == "failed for good: it takes the server down"
    assert "went down while it ran alone" in table.loc[poison_id, "what each showed"]
    others = table.drop(index=poison_id)
    assert (others["verdict"] == "cleared: served alone").all(), others.to_dict("records")
    assert (table["sent alone because"] == "in flight during two crashes: sent alone from now on").all()


@pytest.mark.parametrize(("in_flight", "where"), [(4, "first"), (4, "last"), (16, "first"), (16, "last")])
def test_only_the_poison_fails_beside_neighbours_in_flight_at_every_crash(tmp_path, in_flight, where):
    batch = small_batch(tmp_path / "in.jsonl", 40)
    index = 1 if where == "first" else 38
    poison_id = replace_user_message(batch, index, f"{POISON}: this one crashes the server")["custom_id"]
    faults = Faults(down_s=2.0, down_resets=True, service_s=0.1, slots=in_flight)
    with RunningFaultServer(free_port(), faults) as server:
        result = kvbatch("run", str(batch), "--url", server.url, *QUIET, "--concurrency", str(in_flight),
                         cwd=tmp_path)  # fmt: skip
        counts = dict(server.server.counts)
    assert result.returncode == 1, result.stdout + result.stderr  # 1: some requests failed for good
    run = tmp_path / "data" / "runs" / "in"
    assert_only_the_poison_failed(run, batch, poison_id)
    assert counts["crash (poison)"] >= 3 and counts["reset while down"] > 0, counts  # neighbours met the outage
    assert_solo_turns_tell_why(run, poison_id)


@pytest.mark.parametrize("in_flight", [4, 16])
def test_on_the_embedded_server_only_the_request_that_makes_it_exit_fails(tmp_path, monkeypatch, in_flight):
    """Our own llama-server, killed (SIGKILL) each time the marked request reaches it while others are in flight:
    it is restarted each time, the neighbours are cleared alone, and only the marked request fails for good."""
    import asyncio
    from urllib.parse import urlparse

    import psutil
    from kvbatch.batch.run.runner import run_batch
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.batch.settings import BatchSettings
    from kvbatch.serve.backends.openai_compat import OpenAICompatBackend

    batch = small_batch(tmp_path / "in.jsonl", 40)
    poison_id = replace_user_message(batch, 20, f"{POISON}: this one makes the server exit")["custom_id"]
    send = OpenAICompatBackend.chat
    killed: list[int] = []

    async def chat(self, body, *, slot=None, timeout_s=None):
        if POISON not in str(body["messages"][-1]["content"]):
            return await send(self, body, slot=slot, timeout_s=timeout_s)
        port = str(urlparse(self.base_url).port)
        server = next(p for p in psutil.Process().children(recursive=True)
                      if "llama-server" in p.name() and port in p.cmdline())  # fmt: skip
        attempt = asyncio.ensure_future(send(self, body, slot=slot, timeout_s=timeout_s))
        await asyncio.sleep(0.05)  # on its way to the server (if not, it meets the server down: no evidence)
        server.kill()
        killed.append(server.pid)
        return await attempt

    monkeypatch.setattr(OpenAICompatBackend, "chat", chat)
    run = tmp_path / "run"
    settings = BatchSettings(input_path=batch, folder=RunFolder(run), concurrency=in_flight, slots=in_flight,
                             progress=False)  # fmt: skip
    outcome = run_batch(settings, say=lambda *_: None)
    assert outcome.summary is not None and outcome.summary.failed_total == 1
    assert_only_the_poison_failed(run, batch, poison_id)
    restarts = [e for e in result_lines(run, "events.jsonl") if e["event"] == "recovery"]
    assert len(restarts) >= len(killed) >= 3 and all(e["action"] == "restarted the embedded server" for e in restarts)
    assert_solo_turns_tell_why(run, poison_id)
