"""The run folder's line formats, each made and read here, with its type: results.jsonl and errors.jsonl (OpenAI's
batch output and error lines, which are also the journal), metrics.jsonl (one line per answered request),
events.jsonl (recoveries, back-offs, trials, drains), and memory.csv (the server's memory samples). The writers
(the journal, the recorder, the run folder, the monitor) build their lines with these functions; every reader (the
journal on resume, the report, the API) reads them through these. Lines are read as written (a lone surrogate
kept, a torn last line skipped)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

MEMORY_HEADER = "t_unix_s,used_bytes,probe,endpoint"
_TAIL_BYTES = 256
"""Enough of memory.csv's end for its last line (a sample is under 100 bytes)."""
_CUSTOM_ID_KEY = '"custom_id":'
"""Followed by a space in journals written with the standard library's separators, by the value in compact ones."""
_decoder = json.JSONDecoder()


class ResponsePart(TypedDict):
    status_code: int | None
    request_id: str
    body: dict[str, Any] | None


class ResultLine(TypedDict):
    """A line of results.jsonl: OpenAI's batch output line for an answered request."""

    id: str
    custom_id: str
    response: ResponsePart
    error: None


class ErrorDetail(TypedDict, total=False):
    code: str
    message: str
    last_answer: str | None
    """An answer the request's own contract refused (its schema, its length), when that is why it failed."""
    finish_reason: str | None
    answer_attempts: int


class ErrorLine(TypedDict):
    """A line of errors.jsonl: a request failed for good, why, and after how many attempts."""

    id: str
    custom_id: str
    response: dict[str, Any] | None
    error: ErrorDetail
    attempts: int


class MetricLine(TypedDict):
    """A line of metrics.jsonl: how one answered request went."""

    custom_id: str
    t_done_unix_s: float
    latency_s: float
    waited_s: float
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    prefix: str
    endpoint: str
    slot: int | None
    attempts: int
    answer_attempts: int | None


class EventLine(TypedDict):
    """A line of events.jsonl: its time and kind; the rest of its fields depend on the kind."""

    t_unix_s: float
    event: str


def result_line(custom_id: str, body: dict[str, Any], status_code: int = 200) -> ResultLine:
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": f"req_{secrets.token_hex(12)}", "body": body},
            "error": None}  # fmt: skip


def error_line(custom_id: str, code: str, message: str, *, attempts: int, status_code: int | None = None,
               details: dict[str, Any] | None = None) -> ErrorLine:  # fmt: skip
    error = cast(ErrorDetail, {"code": code, "message": message, **(details or {})})
    response = {"status_code": status_code, "body": None} if status_code else None
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id, "response": response,
            "error": error, "attempts": attempts}  # fmt: skip


def event_line(kind: str, **details: Any) -> str:
    """An events.jsonl line (text, newline-ended); a value JSON cannot hold is written as its text."""
    return json.dumps({"t_unix_s": time.time(), "event": kind, **details}, default=str) + "\n"


def custom_ids(path: Path) -> set[str]:
    """Every `custom_id` in results.jsonl or errors.jsonl (what a resume skips). Reads only the id of each line,
    written near its front: 170,000 whole lines would take seconds to parse."""
    done: set[str] = set()
    if not path.exists():
        return done
    with open(path, encoding="utf-8", errors="surrogatepass") as handle:  # as written: a lone surrogate kept
        for line in handle:
            at = line.find(_CUSTOM_ID_KEY)
            if at < 0:
                continue
            try:
                start = at + len(_CUSTOM_ID_KEY)
                value, _ = _decoder.raw_decode(line, start + (line[start : start + 1] == " "))
            except json.JSONDecodeError:
                continue
            done.add(value)
    return done


def results(path: Path) -> Iterator[ResultLine]:
    return cast(Iterator[ResultLine], jsonl_records(path))


def errors(path: Path) -> Iterator[ErrorLine]:
    return cast(Iterator[ErrorLine], jsonl_records(path))


def metrics(path: Path) -> Iterator[MetricLine]:
    return cast(Iterator[MetricLine], jsonl_records(path))


def events(path: Path) -> Iterator[EventLine]:
    return cast(Iterator[EventLine], jsonl_records(path))


def jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """Each whole line of a JSON-lines file of the run folder, as written (a torn last line, cut by a crash and
    repaired on the next resume, is skipped)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="surrogatepass") as handle:  # the journal keeps a lone surrogate
        for line in handle:
            if line.endswith("\n"):
                yield json.loads(line)


@dataclass(frozen=True)
class MemorySample:
    """One line of memory.csv: the server's memory at a moment, by which probe, on which endpoint."""

    t_unix_s: float
    used_bytes: int
    probe: str
    endpoint: str = ""

    def line(self) -> str:
        return f"{self.t_unix_s:.3f},{self.used_bytes},{self.probe},{self.endpoint}\n"

    @classmethod
    def parse(cls, line: str) -> MemorySample | None:
        fields = line.strip().split(",")
        if len(fields) < 3 or not fields[1].isdigit():
            return None  # the header, or a line cut by a crash
        return cls(float(fields[0]), int(fields[1]), fields[2], fields[3] if len(fields) > 3 else "")


def append_memory_sample(path: Path, used_bytes: int, probe: str, endpoint: str) -> None:
    """One sample at the end of memory.csv (its header first, when the file is new)."""
    new_file = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        if new_file:
            handle.write(MEMORY_HEADER + "\n")
        handle.write(MemorySample(time.time(), used_bytes, probe, endpoint).line())


def last_memory_sample(path: Path) -> MemorySample | None:
    """memory.csv's latest sample, read from its end (the file grows for the whole run)."""
    if not path.exists():
        return None
    with open(path, "rb") as handle:
        handle.seek(max(path.stat().st_size - _TAIL_BYTES, 0))
        last = handle.read().splitlines()[-1:]
    return MemorySample.parse(last[0].decode(errors="replace")) if last else None
