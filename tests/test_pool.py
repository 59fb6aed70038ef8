"""Past one machine: an endpoint pool over several servers (one taken out and re-admitted), several embedded servers,
an endpoints file, and Ray actors, one of whose servers is killed mid-run."""

from __future__ import annotations

import collections
import json

import psutil
import pytest
from batch_helpers import (
    WAIT_CEILING_S,
    has_event,
    input_ids,
    kvbatch,
    result_lines,
    small_batch,
    start_kvbatch,
    wait_for_results,
    wait_until,
)
from fault_server import Faults, RunningFaultServer
from kvbatch.serve.server import free_port

QUIET = ("--no-report", "--no-progress")


def _exactly_once(run_dir, batch) -> list[str]:
    ids = [r["custom_id"] for r in result_lines(run_dir)]
    assert not [i for i, n in collections.Counter(ids).items() if n > 1]
    assert sorted(ids) == sorted(input_ids(batch))
    return ids


def test_a_pool_of_servers_shares_the_batch_and_reports_each(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 120)
    faults = Faults(service_s=0.02, slots=2)
    with RunningFaultServer(free_port(), faults) as one, RunningFaultServer(free_port(), faults) as two:
        result = kvbatch("run", str(batch), "--url", one.url, "--url", two.url, *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "data" / "runs" / "in"
    _exactly_once(run, batch)
    summary = json.loads((run / "summary.json").read_text())
    endpoints = summary["per_endpoint"]
    assert [e["label"] for e in endpoints] == ["external-0", "external-1"]
    assert all(e["completed"] > 20 for e in endpoints) and sum(e["completed"] for e in endpoints) == 120
    assert summary["parallel_slots"] == 4  # each server's own slots, discovered from /props
    plan = json.loads((run / "plan.json").read_text())
    assert len(plan["endpoints"]) == 2 and all("127.0.0.1" in e["server"]["url"] for e in plan["endpoints"])


def test_an_endpoint_that_dies_is_taken_out_and_re_admitted_with_nothing_lost(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 1600)
    # one goes down until the pool has taken it out (past its grace, however long that takes here), then comes back
    # and must be probed and re-admitted while the others still have work
    servers = [RunningFaultServer(free_port(), Faults(service_s=0.05, slots=1)) for _ in range(4)]
    for server in servers:
        server.__enter__()
    try:
        urls = [arg for server in servers for arg in ("--url", server.url)]
        process = start_kvbatch("run", str(batch), *urls, *QUIET, cwd=tmp_path)
        run = tmp_path / "data" / "runs" / "in"
        wait_for_results(run, 60, process)
        servers[2].go_down()  # nothing listening, every connection dropped
        wait_until(lambda: has_event(run, lambda e: e["event"] == "endpoint_out"), "the endpoint taken out", process)
        servers[2].come_back()  # on the same port
        wait_until(lambda: has_event(run, lambda e: e["event"] == "endpoint_back"), "the endpoint re-admitted", process)
        out, _ = process.communicate(timeout=WAIT_CEILING_S)
        served_after = servers[2].server.counts["answered"]
    finally:
        for server in servers:
            server.__exit__(None, None, None)
    assert process.returncode == 0, out
    _exactly_once(run, batch)
    events = result_lines(run, "events.jsonl")
    kinds = [(e["event"], e.get("endpoint")) for e in events]
    assert ("endpoint_out", "external-2") in kinds and ("endpoint_back", "external-2") in kinds
    summary = json.loads((run / "summary.json").read_text())
    by_label = {e["label"]: e for e in summary["per_endpoint"]}
    assert by_label["external-2"]["out_of_pool_s"] > 0
    assert by_label["external-2"]["completed"] > 0 and served_after > 0
    assert not result_lines(run, "errors.jsonl")


def test_one_embedded_server_per_gpu_is_planned_for_its_own_card(monkeypatch, tmp_path):
    """Without a GPU the request is one sentence; with cards (NVML's answer recorded for two), one server each,
    each planned for its own card's memory."""
    batch = small_batch(tmp_path / "in.jsonl", 2)
    result = kvbatch("plan", str(batch), "--servers", "per-gpu", cwd=tmp_path)
    assert result.returncode == 2 and "--servers per-gpu: no NVIDIA GPU answers here" in result.stderr
    from kvbatch.batch.inputs import endpoints
    from kvbatch.measure import budget
    from kvbatch.serve import probes

    cards = [probes.GpuMemory(0, "NVIDIA H100", 80 * 2**30, 1 * 2**30, 1 * 2**30),
             probes.GpuMemory(1, "NVIDIA L4", 24 * 2**30, 0, 0)]  # fmt: skip
    monkeypatch.setattr(probes, "gpu_memory", lambda exclude_pids=None: cards)
    monkeypatch.setattr(budget, "gpu_memory", lambda exclude_pids=None: cards)
    specs = endpoints.endpoint_specs(urls=None, endpoints_file=None, backend="openai", model=None,
                                     servers="per-gpu", ray=None)  # fmt: skip
    assert [(s.kind, s.gpu) for s in specs] == [("embedded", 0), ("embedded", 1)]
    first, second = budget.gpu_budget(0), budget.gpu_budget(1)
    assert first.bytes == int(80 * 2**30 * 0.9) - 2**30 and "NVIDIA H100" in first.text
    assert second.bytes == int(24 * 2**30 * 0.9) and "NVIDIA L4" in second.text


def test_an_endpoints_file_with_a_typo_names_file_line_and_key(tmp_path):
    endpoints = tmp_path / "endpoints.toml"
    endpoints.write_text('[[endpoint]]\nurl = "http://127.0.0.1:9"\n\n[[endpoint]]\nurl = "http://127.0.0.1:8"\n'
                         'slot = 4\n')  # fmt: skip
    batch = small_batch(tmp_path / "in.jsonl", 2)
    result = kvbatch("plan", str(batch), "--endpoints", str(endpoints), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{endpoints}:6: slot: unknown key (known: api_key_env, backend, model, slots, url)" in result.stderr


def test_an_endpoints_file_drives_the_pool(tmp_path):
    faults = Faults(service_s=0.01, slots=2)
    with RunningFaultServer(free_port(), faults) as one, RunningFaultServer(free_port(), faults) as two:
        endpoints = tmp_path / "endpoints.toml"
        endpoints.write_text(f'[[endpoint]]\nurl = "{one.url}"\nslots = 1\n\n[[endpoint]]\nurl = "{two.url}"\n')
        batch = small_batch(tmp_path / "in.jsonl", 30)
        result = kvbatch("run", str(batch), "--endpoints", str(endpoints), *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "data" / "runs" / "in" / "summary.json").read_text())
    assert summary["parallel_slots"] == 3  # 1 from the file, 2 discovered


def test_several_embedded_servers_on_one_machine(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 8)
    result = kvbatch("run", str(batch), "--servers", "2", *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "data" / "runs" / "in"
    _exactly_once(run, batch)
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["per_endpoint"]) == 2 and all(e["completed"] for e in summary["per_endpoint"])
    assert "/ 2 servers" in json.loads((run / "plan.json").read_text())["budget"]
    assert (run / "server-0.log").exists() and (run / "server-1.log").exists()


def _busiest(actors: list[psutil.Process], process) -> psutil.Process:
    """The actor whose llama-server is computing right now, twice in a row: it has a request in flight."""

    def computing() -> psutil.Process | None:
        for actor in actors:
            servers = [c for c in actor.children(recursive=True) if c.name() == "llama-server"]
            if servers and all(servers[0].cpu_percent(interval=0.2) > 20 for _ in range(2)):
                return actor
        return None

    return wait_until(computing, "an actor's server computing a request", process)


def _recovered(event: dict) -> bool:
    return event["event"] == "recovery" and event["action"].startswith("actor: restarted")


@pytest.mark.timeout(2 * WAIT_CEILING_S)
def test_ray_actors_serve_the_batch_and_survive_a_killed_server(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 60)  # enough that requests are still in flight after both kills
    before = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "llama-server"}
    process = start_kvbatch("run", str(batch), "--ray", "local", "--ray-actors", "2", *QUIET, cwd=tmp_path)
    run = tmp_path / "data" / "runs" / "in"
    # both actors serving: each has started its own server (and stopped the short-lived one that probed its memory;
    # on a slow machine one actor may still be probing when the other has served several requests)
    wait_until(lambda: {m["endpoint"] for m in result_lines(run, "metrics.jsonl")} >= {"ray-0", "ray-1"},
               "both actors serving", process)  # fmt: skip
    actors = [p for p in psutil.process_iter(["cmdline"]) if "ray::ServerActor" in " ".join(p.info["cmdline"] or [])]
    servers = [c for actor in actors for c in actor.children(recursive=True) if c.name() == "llama-server"
               and c.pid not in before]  # fmt: skip
    assert len(servers) >= 2, "one llama-server per actor"
    servers[0].kill()  # the actor restarts its own server
    # the next step needs that recovery over (however long a restart takes here) and requests flowing again
    wait_until(lambda: has_event(run, _recovered), "the actor restarted its server", process)
    done = len(result_lines(run))
    wait_for_results(run, done + 2, process)
    actors = [p for p in psutil.process_iter(["cmdline"]) if "ray::ServerActor" in " ".join(p.info["cmdline"] or [])]
    assert len(actors) == 2, "one Ray actor per server"
    _busiest(actors, process).kill()  # the actor itself dies mid-request: Ray restarts it, and it starts a server
    out, _ = process.communicate(timeout=WAIT_CEILING_S)
    assert process.returncode == 0, out
    _exactly_once(run, batch)
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(e["label"] for e in summary["per_endpoint"]) == ["ray-0", "ray-1"]
    events = result_lines(run, "events.jsonl")
    assert any(e["event"] == "recovery" and e["action"].startswith("actor: restarted") for e in events)
    # the killed actor's request failed as "gone or restarting" and was retried on the actor Ray restarted
    assert any(e["event"] == "recovery" and "the Ray actor is gone or restarting" in e["cause"] for e in events)
