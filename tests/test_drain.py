"""Memory the plan could not price is let go: our own server, past its bound, is drained (its requests in flight
finish, no new one starts) and restarted, and the run goes on with nothing lost and nothing charged."""

from __future__ import annotations

import json

from batch_helpers import input_ids, kvbatch, result_lines, small_batch

QUIET = ("--no-report", "--no-progress")


def test_the_embedded_server_past_its_bound_is_drained_and_restarted_once_with_nothing_lost_or_charged(tmp_path):
    """A bound every serving server passes (1 MiB), on one slot, memory sampled every 0.05 s (each answer of 32
    tokens takes longer, on any machine): once the slot has served, the server is drained and restarted; after the
    restart its memory never falls below the bound, so it is not restarted again. Every request is answered once,
    none failed or retried, and the event gives the memory before and after."""
    batch = small_batch(tmp_path / "in.jsonl", 24, max_tokens=32)
    result = kvbatch("run", str(batch), "--parallel", "1", "--concurrency", "1", "--memory-sample-s", "0.05",
                     "--restart-above", "1MiB", *QUIET, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "data" / "runs" / "in"
    ids = [r["custom_id"] for r in result_lines(run, "results.jsonl")]
    assert sorted(ids) == sorted(input_ids(batch)) and not result_lines(run, "errors.jsonl")
    events = result_lines(run, "events.jsonl")
    drains = [e for e in events if e["event"] == "drained_and_restarted"]
    assert len(drains) == 1, [e["event"] for e in events]
    drain = drains[0]
    assert drain["served_before"] >= 1 and drain["before_bytes"] > 2**20 and drain["after_bytes"], drain
    assert drain["bound_bytes"] == 2**20 and drain["action"] == "restarted, same layout"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["retries"] == 0 and summary["failed_total"] == 0, summary
    assert not [e for e in events if e["event"] in ("recovery", "endpoint_out", "memory_over_plan")], events


def test_the_drain_bound_is_the_plans_peak_and_its_allowance_never_above_the_budget():
    """Past the budget the kernel's out-of-memory killer (or the card) may end the server before a drain: the bound
    the run drains at stays under it whenever the plan does."""
    from kvbatch.batch.run.execution.drain import restart_bound

    mib = 2**20
    assert restart_bound(550 * mib) == 614 * mib  # at least 64 MiB above a small plan
    assert restart_bound(2000 * mib) == 2200 * mib  # 10 % above a large one
    assert restart_bound(550 * mib, budget_bytes=580 * mib) == 580 * mib  # a tight budget: drained at the budget
    assert restart_bound(550 * mib, budget_bytes=23 * 1024 * mib) == 614 * mib
    assert restart_bound(600 * mib, budget_bytes=580 * mib) == 664 * mib  # a plan over its budget: the plan's bound
