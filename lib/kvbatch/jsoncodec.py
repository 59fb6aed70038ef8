"""JSON on the executor's hot path: every request is read from the input, encoded for the server, decoded from its
reply and written to the journal and the metrics, and its body holds the whole system prompt (10 KB for 2,400
tokens). The standard library spends most of an instant server's round trip on that; orjson does the same work
several times faster (bench/bench_executor.py part 4 prints the executor against a bare client loop).

orjson refuses some things JSON and Python's own module allow (a lone surrogate escape, an integer beyond 64 bits,
a non-string key): those fall back to the standard library, so what is accepted and what is written is the same as
with `json`, only faster. Output is compact UTF-8 (no ASCII escapes), as `json.dumps(ensure_ascii=False)` gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

JSONDecodeError = json.JSONDecodeError


def loads(data: bytes | str, *, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """Decode one JSON document; raises `json.JSONDecodeError` (or ValueError) exactly as `json.loads` would.
    `parse_constant` is the standard library's hook for NaN and Infinity (orjson refuses them outright)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # the standard library's verdict and message, or a value orjson would not take
        return json.loads(data, parse_constant=parse_constant)


def dumps(value: Any) -> bytes:
    """Encode as compact UTF-8 JSON bytes (a lone surrogate passes through, as the journal has always kept it)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def dumps_line(value: Any) -> bytes:
    """One JSONL line: the document and its newline, ready for a single write(2)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return dumps(value) + b"\n"
