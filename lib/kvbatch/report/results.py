"""Read a run folder back: results, errors, per-request metrics, memory series, plan and summary as DataFrames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kvbatch.batch import records
from kvbatch.batch.plan.plan_record import read_plan
from kvbatch.batch.run.journal import RunRecord
from kvbatch.batch.run.summary import Summary
from kvbatch.batch.runfolder import RunFolder
from kvbatch.serve.backends.openai_compat import cached_tokens_from

RESULT_COLUMNS = [
    "custom_id", "status", "answer", "finish_reason", "prompt_tokens", "cached_tokens", "completion_tokens",
    "latency_s", "attempts", "answer_attempts", "error_code", "error_message",
]  # fmt: skip


def _completed_rows(folder: RunFolder) -> list[dict[str, Any]]:
    rows = []
    for record in records.results(folder.results):
        body = record["response"]["body"] or {}
        choice = (body.get("choices") or [{}])[0]
        usage = body.get("usage") or {}
        cached = cached_tokens_from(body)
        rows.append({"custom_id": record["custom_id"], "status": "completed",
                     "answer": (choice.get("message") or {}).get("content"),
                     "finish_reason": choice.get("finish_reason"), "prompt_tokens": usage.get("prompt_tokens"),
                     "cached_tokens": cached, "completion_tokens": usage.get("completion_tokens")})  # fmt: skip
    return rows


def _failed_rows(folder: RunFolder) -> list[dict[str, Any]]:
    return [{"custom_id": r["custom_id"], "status": "failed", "answer": r["error"].get("last_answer"),
             "finish_reason": r["error"].get("finish_reason"), "attempts": r.get("attempts"),
             "answer_attempts": r["error"].get("answer_attempts"), "error_code": r["error"]["code"],
             "error_message": r["error"]["message"]}
            for r in records.errors(folder.errors)]  # fmt: skip


def _json_fields(frame: pd.DataFrame) -> pd.DataFrame:
    """The top-level fields of the answers that asked for JSON, one column each (a nested value as JSON text)."""
    asked = frame["answer_attempts"].notna() if "answer_attempts" in frame else pd.Series(False, index=frame.index)
    if not asked.any():
        return frame
    fields: dict[str, dict[int, Any]] = {}
    for index, text in frame.loc[asked & frame["answer"].notna(), "answer"].items():
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                column = key if key not in frame.columns else f"answer.{key}"
                fields.setdefault(column, {})[index] = item
    frame.attrs["answer_fields"] = list(fields)
    for column, values in fields.items():
        series = pd.Series(values, dtype=object).reindex(frame.index)
        kind = pd.api.types.infer_dtype(series, skipna=True)
        if kind in ("integer", "boolean"):
            series = series.convert_dtypes()
        elif kind in ("floating", "mixed-integer-float"):
            series = pd.to_numeric(series)
        elif kind != "string":  # nested values, or a field of mixed types: JSON text, which every format keeps
            series = series.map(lambda v: v if v is None or (isinstance(v, float) and pd.isna(v))
                                else json.dumps(v, ensure_ascii=False))  # fmt: skip
        frame[column] = series
    return frame


def _input_columns(folder: RunFolder, frame: pd.DataFrame) -> pd.DataFrame:
    """A table input's own columns, joined on its id column (or its row number, `row-N`)."""
    from kvbatch.batch.inputs.table import TableInput

    run = RunRecord.read(folder.run_file)
    source = run.input if run is not None else None
    if source is None or not source.table or not Path(source.path).is_file():
        return frame
    path, id_column = Path(source.path), source.id_column
    table = TableInput(path, Path(), "", id_column)  # the run's own reader: the ids come out as the run made them
    rows = [{**row, "custom_id": table.custom_id(line_no, row)} for line_no, row in table.rows()]
    if not rows:
        return frame
    joined = pd.DataFrame(rows).drop(columns=[id_column] if id_column else [])
    joined = joined.rename(columns={c: c if c not in frame.columns or c == "custom_id" else f"input.{c}"
                                    for c in joined.columns})  # fmt: skip
    return frame.merge(joined, on="custom_id", how="left")


def load_results(run_dir: Path | str) -> pd.DataFrame:
    """One row per request with an outcome: status (completed or failed), the answer, finish reason, tokens,
    latency, attempts (a failed one: its error and last answer); for answers that asked for JSON, its top-level
    fields as columns; for a table input, the table's own columns joined on its id. `kvbatch export` writes it."""
    folder = RunFolder(Path(run_dir))
    frame = pd.DataFrame(_completed_rows(folder) + _failed_rows(folder), columns=RESULT_COLUMNS)
    metrics = list(records.metrics(folder.metrics))
    if metrics:
        per_request = pd.DataFrame(metrics).drop_duplicates("custom_id", keep="last").set_index("custom_id")
        for column in ("latency_s", "attempts", "answer_attempts"):
            if column in per_request:
                known = frame["custom_id"].map(per_request[column])
                frame[column] = known.where(known.notna(), frame[column])
    for column in ("prompt_tokens", "cached_tokens", "completion_tokens", "attempts", "answer_attempts"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    frame["latency_s"] = pd.to_numeric(frame["latency_s"], errors="coerce")
    frame = _json_fields(frame)
    fields = frame.attrs.get("answer_fields", [])
    frame = _input_columns(folder, frame)
    frame.attrs["answer_fields"] = fields
    return frame


def answer_distributions(frame: pd.DataFrame, *, most_values: int = 12) -> dict[str, pd.Series]:
    """For each JSON answer field that is a boolean, an integer or a string of few values (an enum): how many
    answers gave each value (the report's bar charts)."""
    counts: dict[str, pd.Series] = {}
    done = frame[frame["status"] == "completed"] if "status" in frame else frame
    for column in frame.attrs.get("answer_fields", []):
        values = done[column].dropna()
        if values.empty:
            continue
        kind = pd.api.types.infer_dtype(values, skipna=True)
        if kind == "boolean" or kind == "integer" or (kind == "string" and values.nunique() <= most_values):
            counts[column] = values.value_counts().sort_index()
    return counts


EXPORT_FORMATS = ("csv", "parquet", "jsonl")


def answer_overview(frame: pd.DataFrame) -> list[str]:
    """The report's answer charts as lines for a terminal: `decision: advance 9, hold 7`."""
    return [f"{field}: " + ", ".join(f"{value} {count}" for value, count in counts.items())
            for field, counts in answer_distributions(frame).items()]  # fmt: skip


def export_results(run_dir: Path | str, out: Path, fmt: str) -> int:
    """Write `load_results` as CSV, Parquet (pyarrow) or JSON lines; returns the rows written."""
    return write_table(load_results(run_dir), out, fmt)


def write_table(frame: pd.DataFrame, out: Path, fmt: str) -> int:
    """Write a `load_results` frame as CSV, Parquet (pyarrow) or JSON lines, whole or not at all (a file beside it,
    then renamed: an interrupted write leaves the last table); returns the rows written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    if fmt == "csv":
        frame.to_csv(partial, index=False)
    elif fmt == "parquet":
        frame.to_parquet(partial, index=False, engine="pyarrow")
    else:
        frame.to_json(partial, orient="records", lines=True, force_ascii=False)
    partial.replace(out)
    return len(frame)


def load_errors(run_dir: Path | str) -> pd.DataFrame:
    rows = [
        {
            "custom_id": r["custom_id"],
            "code": r["error"]["code"],
            "message": r["error"]["message"],
            "attempts": r.get("attempts"),
        }
        for r in records.errors(RunFolder(Path(run_dir)).errors)
    ]
    return pd.DataFrame(rows, columns=["custom_id", "code", "message", "attempts"])


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    frame = pd.DataFrame(list(records.metrics(RunFolder(Path(run_dir)).metrics)))
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
    return pd.DataFrame(list(records.events(RunFolder(Path(run_dir)).events)))


SOLO_COLUMNS = ["custom_id", "sent alone because", "crashes in flight", "solo attempts", "what each showed", "verdict"]


def solo_turns(events: pd.DataFrame, errors: pd.DataFrame) -> pd.DataFrame:
    """Each request the failure policy sent alone: why (the decision that made it a suspect), what each solo
    attempt showed, and how it ended (failed for good as the request that takes the server down, or cleared)."""
    if events.empty or "custom_id" not in events:
        return pd.DataFrame(columns=SOLO_COLUMNS)
    failures = events[(events["event"] == "failure") & (events.get("action") == "retry alone")]
    solos = events[events["event"] == "solo_attempt"]
    failed = dict(zip(errors["custom_id"], errors["code"], strict=True)) if not errors.empty else {}
    rows = []
    for custom_id in dict.fromkeys([*failures["custom_id"], *solos["custom_id"]]):
        made = failures[failures["custom_id"] == custom_id]
        first = made.iloc[0] if not made.empty else None
        turns = solos[solos["custom_id"] == custom_id]
        shown = [t["reason"] if isinstance(t.get("reason"), str) else t["outcome"] for t in turns.to_dict("records")]
        crashes = made["crashes_in_flight"].max() if "crashes_in_flight" in made and not made.empty else None
        rows.append({
            "custom_id": custom_id,
            "sent alone because": first["reason"] if first is not None else "",
            "crashes in flight": int(crashes) if crashes is not None and pd.notna(crashes) else None,
            "solo attempts": len(turns),
            "what each showed": "; ".join(f"{i}. {text}" for i, text in enumerate(shown, 1)),
            "verdict": ("failed for good: it takes the server down" if "failed for good" in set(turns["outcome"])
                        else "failed for good: " + str(failed[custom_id]) if custom_id in failed
                        else "cleared: served alone" if "served" in set(turns["outcome"]) else "not finished"),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=SOLO_COLUMNS)


def load_summary(run_dir: Path | str) -> dict[str, Any]:
    """summary.json as a dict (empty before the first invocation ends)."""
    return Summary.fields(RunFolder(Path(run_dir)).summary)


def load_plan(run_dir: Path | str) -> dict[str, Any]:
    """plan.json as a dict."""
    return read_plan(RunFolder(Path(run_dir)).plan)


def throughput_per_interval(metrics: pd.DataFrame, interval_s: float = 10.0) -> pd.DataFrame:
    """Requests finished per interval, as requests per second."""
    if metrics.empty:
        return pd.DataFrame(columns=["t_s", "requests_per_s"])
    start = metrics["t_done_unix_s"].min()
    bins = ((metrics["t_done_unix_s"] - start) // interval_s).astype(int)
    counts = bins.value_counts().sort_index()
    return pd.DataFrame({"t_s": counts.index * interval_s, "requests_per_s": counts.values / interval_s})
