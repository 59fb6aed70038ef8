"""Read a run folder back: results, errors, per-request metrics, memory series, plan and summary as DataFrames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kvbatch.batch.runfolder import RunFolder


def _jsonl_records(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8", errors="surrogatepass") as handle:  # the journal keeps a lone surrogate
        for line in handle:
            if line.endswith("\n"):
                records.append(json.loads(line))
    return records


def load_results(run_dir: Path | str) -> pd.DataFrame:
    """One row per completed request: custom_id, answer text, finish reason and token counts."""
    rows = []
    for record in _jsonl_records(RunFolder(Path(run_dir)).results):
        body = record["response"]["body"]
        choice = (body.get("choices") or [{}])[0]
        usage = body.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens", (body.get("timings") or {}).get("cache_n"))
        rows.append(
            {
                "custom_id": record["custom_id"],
                "answer": (choice.get("message") or {}).get("content"),
                "finish_reason": choice.get("finish_reason"),
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": cached,
                "completion_tokens": usage.get("completion_tokens"),
            }
        )
    return pd.DataFrame(
        rows, columns=["custom_id", "answer", "finish_reason", "prompt_tokens", "cached_tokens", "completion_tokens"]
    )


def load_errors(run_dir: Path | str) -> pd.DataFrame:
    rows = [
        {
            "custom_id": r["custom_id"],
            "code": r["error"]["code"],
            "message": r["error"]["message"],
            "attempts": r.get("attempts"),
        }
        for r in _jsonl_records(RunFolder(Path(run_dir)).errors)
    ]
    return pd.DataFrame(rows, columns=["custom_id", "code", "message", "attempts"])


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    frame = pd.DataFrame(_jsonl_records(RunFolder(Path(run_dir)).metrics))
    if not frame.empty:
        frame["t"] = pd.to_datetime(frame["t_done_unix_s"], unit="s")
    return frame


def load_memory(run_dir: Path | str) -> pd.DataFrame:
    path = RunFolder(Path(run_dir)).memory
    if not path.exists():
        return pd.DataFrame(columns=["t_unix_s", "used_bytes", "probe", "t"])
    frame = pd.read_csv(path)
    frame["t"] = pd.to_datetime(frame["t_unix_s"], unit="s")
    return frame


def load_events(run_dir: Path | str) -> pd.DataFrame:
    return pd.DataFrame(_jsonl_records(RunFolder(Path(run_dir)).events))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8")) if path.exists() else {}


def load_summary(run_dir: Path | str) -> dict[str, Any]:
    """summary.json as a dict (empty before the first invocation ends)."""
    return _json(RunFolder(Path(run_dir)).summary)


def load_plan(run_dir: Path | str) -> dict[str, Any]:
    """plan.json as a dict."""
    return _json(RunFolder(Path(run_dir)).plan)


def throughput_per_interval(metrics: pd.DataFrame, interval_s: float = 10.0) -> pd.DataFrame:
    """Requests finished per interval, as requests per second."""
    if metrics.empty:
        return pd.DataFrame(columns=["t_s", "requests_per_s"])
    start = metrics["t_done_unix_s"].min()
    bins = ((metrics["t_done_unix_s"] - start) // interval_s).astype(int)
    counts = bins.value_counts().sort_index()
    return pd.DataFrame({"t_s": counts.index * interval_s, "requests_per_s": counts.values / interval_s})
