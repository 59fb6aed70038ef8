"""The run report: rendered headless from a run folder, listed in reports/index.html, with answer text escaped."""

from __future__ import annotations

import json
import re

from batch_helpers import kvbatch
from kvbatch.batch.run.journal import Fingerprint, Journal
from kvbatch.results import load_results

EVIL = "<script>alert('x')</script>"


def test_run_report_renders_and_escapes_answer_text(in_tmp_repo):
    run_dir = in_tmp_repo / "data" / "runs" / "evil"
    fingerprint = Fingerprint(
        input_hash="sha256:0", model="m", system_prompt_hash="sha256:1", generation={}, mode="independent"
    )
    journal = Journal.open(run_dir, fingerprint)
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": EVIL}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 90}},
    }
    journal.record_result("c-1", body)
    journal.record_error("c-2", "ContextOverflowError", f"too long: {EVIL}", attempts=1, status_code=400)
    journal.close()
    (run_dir / "metrics.jsonl").write_text(
        json.dumps(
            {
                "custom_id": "c-1",
                "t_done_unix_s": 1.0e9,
                "latency_s": 0.5,
                "prompt_tokens": 100,
                "cached_tokens": 90,
                "completion_tokens": 5,
                "finish_reason": "stop",
                "prefix": "p",
                "slot": 0,
                "attempts": 1,
            }
        )
        + "\n"
    )
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "completed_total": 1,
                "failed_total": 1,
                "requests_per_s": 2.0,
                "system_prompt_share_served_from_cache": 0.99,
            }
        )
    )
    frame = load_results(run_dir)
    assert frame.loc[0, "answer"] == EVIL and frame.loc[0, "cached_tokens"] == 90

    result = kvbatch("report", "--run", str(run_dir), cwd=in_tmp_repo)
    assert result.returncode == 0, result.stderr
    html = (in_tmp_repo / "reports" / "run-evil.html").read_text()
    assert EVIL not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html or "&lt;script&gt;" in html
    assert "Requests that failed for good" in html and "ContextOverflowError" in html
    index = (in_tmp_repo / "reports" / "index.html").read_text()
    assert 'href="run-evil.html"' in index and "system prompt from cache: 99.0%" in index


def test_report_of_a_folder_that_is_not_a_run_is_one_sentence(in_tmp_repo):
    result = kvbatch("report", "--run", "nothing-here", cwd=in_tmp_repo)
    assert result.returncode == 2
    assert "is not a run folder (no run.json); run `make batch` first" in result.stderr


def test_the_report_of_a_real_run_speaks_to_a_person(in_tmp_repo):
    from batch_helpers import small_batch

    batch = small_batch(in_tmp_repo / "in.jsonl", 4)
    result = kvbatch("run", str(batch), "--run", "real", "--no-progress", "--concurrency", "1", cwd=in_tmp_repo)
    assert result.returncode == 0, result.stderr
    assert "report: reports/run-real.html" in result.stdout
    assert "IPKernelApp" not in result.stdout + result.stderr  # the kernel's noise stays out of the terminal
    html = (in_tmp_repo / "reports" / "run-real.html").read_text()
    shown = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", html)  # what a person reads, not a chart's bytes
    for raw in ("memory_peak_bytes", "predicted_kv_bytes", "e+09", "t_unix_s", "cache_share_of_prompt_tokens"):
        assert raw not in shown, raw
    assert "MiB" in html and "%" in html and "KV cache (global + sliding window)" in html
    assert "estimated by the plan" in html and "re-estimated from the run" in html
    summary = json.loads((in_tmp_repo / "data" / "runs" / "real" / "summary.json").read_text())
    cut = [r for r in load_results(in_tmp_repo / "data" / "runs" / "real").itertuples() if r.finish_reason == "length"]
    assert summary["answers_cut_at_max_tokens"] == len(cut) > 0  # 6-token answers: every one reaches max_tokens
