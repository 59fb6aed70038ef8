"""The OpenAI Batch input format (JSONL: `custom_id`, `method`, `url`, `body`), and its index beside the run.

Inputs are streamed (memory grows with nothing but per-prefix line offsets and per-request sizes), validated in
full before the first request, and read back by byte offset. The index (`input-index.json`) is written and read
here alone; a resume of an unchanged input loads it instead of scanning again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvbatch import jsoncodec
from kvbatch.batch.inputs.requests import (
    HASH_ALGORITHM,
    BatchRequest,
    InputProblem,
    InputReport,
    check_body,
    clean_body,
    not_utf8,
    reject_constant,
)
from kvbatch.batch.runfolder import write_durably
from kvbatch.errors import UserInputError

SUPPORTED_URLS = ("/v1/chat/completions",)
INDEX_VERSION = 2
_BOM = b"\xef\xbb\xbf"


def _problem(report: InputReport, path: Path, line_no: int, name: str, reason: str) -> None:
    report.problems.append(InputProblem(str(path), line_no, name, reason))


def _decode(raw: bytes, line_no: int) -> str:
    if line_no == 1 and raw.startswith(_BOM):  # Windows tools write a byte-order mark first
        raw = raw[len(_BOM) :]
    return raw.decode("utf-8").rstrip("\r\n")


def scan_openai_batch(
    path: Path,
    *,
    max_problems: int = 1000,
    refused: dict[str, str] | None = None,
    accepted: frozenset[str] | None = None,
    schema_keywords: dict[str, str] | None = None,
) -> InputReport:
    """Validate an OpenAI Batch JSONL file line by line, and index it for the executor. `refused` names body
    fields the chosen server cannot honour; `accepted`, when given, the only ones it takes (the rest are noted)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"input file not found: {path}")
    stat = path.stat()
    report = InputReport(path=str(path), file_state=(stat.st_size, stat.st_mtime_ns))
    digest = hashlib.sha256()
    first_line_of: dict[str, int] = {}
    foreign_models: dict[str, int] = {}
    streamed = pinned = 0
    not_sent: collections.Counter = collections.Counter()
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            digest.update(raw)
            line_offset, offset = offset, offset + len(raw)
            if len(report.problems) >= max_problems or not raw.strip():
                continue
            try:
                text = _decode(raw, line_no)
            except UnicodeDecodeError as exc:
                _problem(report, path, line_no, "(line)", f"not UTF-8: byte 0x{raw[exc.start]:02x} at column "
                         f"{exc.start + 1}")  # fmt: skip
                continue
            try:
                record = jsoncodec.loads(text, parse_constant=reject_constant)
            except json.JSONDecodeError as exc:
                _problem(report, path, line_no, "(line)", f"invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            except RecursionError:
                _problem(report, path, line_no, "(line)", "JSON nested too deeply to read")
                continue
            except ValueError as exc:
                _problem(report, path, line_no, "(line)", str(exc))
                continue
            if not isinstance(record, dict):
                _problem(report, path, line_no, "(line)", "must be a JSON object")
                continue
            custom_id = record.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                _problem(report, path, line_no, "custom_id", "missing or not a non-empty string")
                continue
            why = not_utf8(custom_id)
            if why:
                _problem(report, path, line_no, "custom_id", why)
                continue
            if custom_id in first_line_of:
                _problem(report, path, line_no, "custom_id",
                         f"duplicate {custom_id!r} (first on line {first_line_of[custom_id]})")  # fmt: skip
                continue
            first_line_of[custom_id] = line_no
            if record.get("method", "POST") != "POST":
                _problem(report, path, line_no, "method", f"{record.get('method')!r} is not supported; use POST")
                continue
            if record.get("url", SUPPORTED_URLS[0]) not in SUPPORTED_URLS:
                _problem(report, path, line_no, "url",
                         f"{record.get('url')!r} is not supported; use {SUPPORTED_URLS[0]}")  # fmt: skip
                continue
            body = record.get("body")
            messages = check_body(body, (str(path), line_no), report.problems, refused, accepted, not_sent,
                                  schema_keywords)
            if messages is None:
                continue
            if body.get("model"):
                foreign_models[str(body["model"])] = foreign_models.get(str(body["model"]), 0) + 1
            streamed += bool(body.get("stream"))
            pinned += "id_slot" in body
            report.add(custom_id, messages, body, line_offset)
    report.input_hash = f"{HASH_ALGORITHM}:{digest.hexdigest()}"
    if len(report.problems) >= max_problems:
        report.notes.append(f"stopped listing problems after {max_problems}")
    if foreign_models:
        names = ", ".join(f"{name!r} ({count})" for name, count in sorted(foreign_models.items()))
        report.notes.append(
            f"body.model names another service's model on some lines: {names}; they are sent to the configured "
            "model instead"
        )
    if streamed:
        report.notes.append(
            f"{streamed} line(s) ask for stream: true; batch results are collected whole, so they run with "
            "stream: false"
        )
    for key, count in sorted(not_sent.items()):
        report.notes.append(f"body.{key} on {count} line(s): the server does not take it, so it is not sent")
    if pinned:
        report.notes.append(f"{pinned} line(s) set id_slot; kvbatch assigns slots itself, so it is not sent")
    return report


def input_signature(path: Path) -> dict[str, Any]:
    stat = Path(path).stat()
    return {
        "index_version": INDEX_VERSION,
        "path": str(Path(path).resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def save_index(report: InputReport, index_path: Path) -> None:
    """Keep a valid scan beside the run, so a resume of an unchanged input skips re-reading it (24 s for a
    2.1 GiB, 170,000-request file here; loading the index takes well under a second)."""
    data = {
        "signature": input_signature(Path(report.path)),
        "path": report.path,
        "request_count": report.request_count,
        "notes": report.notes,
        "input_hash": report.input_hash,
        "prefix_texts": report.prefix_texts,
        "prefix_offsets": {key: offsets.tolist() for key, offsets in report.prefix_offsets.items()},
        "user_chars": report.user_chars.tolist(),
        "max_tokens": report.max_tokens.tolist(),
        "longest_request": list(report.longest_request),
        "json_answers": report.json_answers,
    }
    write_durably(index_path, json.dumps(data, ensure_ascii=False))


def load_index(index_path: Path, input_path: Path) -> InputReport | None:
    """The saved scan, if it was made of this very file (same path, size and modification time)."""
    if not index_path.exists() or not Path(input_path).is_file():
        return None
    try:
        data = json.loads(index_path.read_text("utf-8"))
        if data.get("signature") != input_signature(input_path):
            return None
        return InputReport(
            path=data["path"],
            request_count=data["request_count"],
            notes=data["notes"],
            input_hash=data["input_hash"],
            prefix_texts=data["prefix_texts"],
            prefix_offsets={key: array("q", offsets) for key, offsets in data["prefix_offsets"].items()},
            user_chars=array("i", data["user_chars"]),
            max_tokens=array("i", data["max_tokens"]),
            longest_request=tuple(data["longest_request"]),
            json_answers=data["json_answers"],
            file_state=(data["signature"]["size"], data["signature"]["mtime_ns"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable index is only a missed shortcut: scan again


_ID_KEY = b'"custom_id"'
_decoder = json.JSONDecoder()


def _custom_id_of(raw: bytes) -> str | None:
    """The custom_id of a validated line without parsing the whole line (its body is most of it); None when the
    quick read is not sure, and the whole line is parsed instead. Only a line with one "custom_id" key is read
    this way: there it is the top-level one (a validated line has it), not a key inside the body."""
    at = raw.find(_ID_KEY)
    if at < 0 or raw.find(_ID_KEY, at + 1) >= 0:
        return None
    text = raw[at + len(_ID_KEY) : at + len(_ID_KEY) + 4096].decode("utf-8", "replace").lstrip(" :")
    try:
        value, _ = _decoder.raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


class InputChangedError(UserInputError):
    """The input file changed while the run read it by byte offsets."""


def iter_openai_batch(report: InputReport, done: set[str] | frozenset[str] = frozenset()) -> Iterator[BatchRequest]:
    """Yield the validated requests, prefix group by prefix group (largest first), skipping `done` ids. The file
    must stay as it was validated: a change in size or modification time stops the run (the offsets would point
    into other requests)."""
    groups = sorted(report.prefix_offsets.items(), key=lambda item: -len(item[1]))
    with open(report.path, "rb") as handle:
        for key, offsets in groups:
            for offset in offsets:
                now = os.fstat(handle.fileno())  # the file as validated, edited in place or not
                if report.file_state and (now.st_size, now.st_mtime_ns) != report.file_state:
                    raise InputChangedError(
                        f"{report.path} changed while the run was reading it; every finished request is saved. "
                        "Put the edited input under another --run name, or restore the original file to resume."
                    )
                handle.seek(offset)
                raw = handle.readline()
                if done and _custom_id_of(raw) in done:
                    continue  # read only the id of a request already done: a resume skips 170,000 lines in 0.3 s
                record = jsoncodec.loads(raw[3:] if offset == 0 and raw.startswith(_BOM) else raw)
                if record["custom_id"] in done:
                    continue
                yield BatchRequest(record["custom_id"], clean_body(record["body"]), 0, key)
