"""Batch input: the OpenAI Batch JSONL format, or a table plus a system prompt and a template.

Inputs are streamed (memory grows with nothing but the list of ids and per-prefix line offsets), and
validated in full before the first request so every bad line is reported at once with file, line and field.
"""

from __future__ import annotations

import hashlib
import json
import string
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbatch.errors import UserInputError

SUPPORTED_URLS = ("/v1/chat/completions",)
ROLES = ("system", "developer", "user", "assistant", "tool")
HASH_ALGORITHM = "sha256"


@dataclass(frozen=True)
class BatchRequest:
    """One request to run. `prefix_key` groups requests whose messages before the last one are byte-identical."""

    custom_id: str
    body: dict[str, Any]
    line_no: int
    prefix_key: str


@dataclass(frozen=True)
class InputProblem:
    path: str
    line_no: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.field}: {self.reason}"


class InvalidInputError(UserInputError):
    """The input has bad lines; all of them are listed, nothing was started."""

    def __init__(self, problems: list[InputProblem], *, shown: int = 50) -> None:
        listed = "\n  ".join(str(p) for p in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        super().__init__(f"{len(problems)} problem(s) in the input; nothing was started:\n  {listed}{more}")
        self.problems = problems


@dataclass
class InputReport:
    """What a validation pass learned: counts, problems, notes, sizes for the planner, and where each prefix lives."""

    path: str
    request_count: int = 0
    problems: list[InputProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    input_hash: str = ""
    prefix_offsets: dict[str, array] = field(default_factory=dict)
    prefix_texts: dict[str, str] = field(default_factory=dict)
    user_chars: array = field(default_factory=lambda: array("i"))
    max_tokens: array = field(default_factory=lambda: array("i"))
    longest_request: tuple[str, int] = ("", 0)
    generation_params: dict[str, Any] = field(default_factory=dict)

    def raise_if_invalid(self) -> None:
        if self.problems:
            raise InvalidInputError(self.problems)


def prefix_of(messages: list[dict[str, Any]]) -> str:
    """The shared prefix of a chat request: every message before the last, as the text the server caches."""
    return json.dumps(messages[:-1], ensure_ascii=False, sort_keys=True)


def prefix_key(prefix_text: str) -> str:
    return hashlib.sha256(prefix_text.encode()).hexdigest()[:16]


def _message_text(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _check_body(body: Any, where: tuple[str, int], problems: list[InputProblem]) -> list[dict[str, Any]] | None:
    path, line_no = where
    if not isinstance(body, dict):
        problems.append(InputProblem(path, line_no, "body", "must be a JSON object"))
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append(InputProblem(path, line_no, "body.messages", "must be a non-empty list of messages"))
        return None
    for index, message in enumerate(messages):
        name = f"body.messages[{index}]"
        if not isinstance(message, dict):
            problems.append(InputProblem(path, line_no, name, "must be an object with role and content"))
            return None
        if message.get("role") not in ROLES:
            problems.append(InputProblem(path, line_no, f"{name}.role", f"must be one of {', '.join(ROLES)}"))
            return None
        if _message_text(message) is None:
            problems.append(
                InputProblem(path, line_no, f"{name}.content", "must be a string (or a list of text parts)")
            )
            return None
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and (not isinstance(body[key], int) or body[key] < 1):
            problems.append(InputProblem(path, line_no, f"body.{key}", "must be a positive integer"))
            return None
    return messages


def scan_openai_batch(path: Path, *, max_problems: int = 1000) -> InputReport:
    """Validate an OpenAI Batch JSONL file line by line, and index it for the executor."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"input file not found: {path}")
    report = InputReport(path=str(path))
    digest = hashlib.sha256()
    first_line_of: dict[str, int] = {}
    foreign_models: dict[str, int] = {}
    streamed = 0
    problems = report.problems
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            digest.update(raw)
            line_offset, offset = offset, offset + len(raw)
            if len(problems) >= max_problems:
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                problems.append(
                    InputProblem(
                        str(path),
                        line_no,
                        "(line)",
                        f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}",
                    )
                )
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(
                    InputProblem(str(path), line_no, "(line)", f"invalid JSON: {exc.msg} at column {exc.colno}")
                )
                continue
            if not isinstance(record, dict):
                problems.append(InputProblem(str(path), line_no, "(line)", "must be a JSON object"))
                continue
            custom_id = record.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                problems.append(InputProblem(str(path), line_no, "custom_id", "missing or not a non-empty string"))
                continue
            if custom_id in first_line_of:
                problems.append(
                    InputProblem(
                        str(path),
                        line_no,
                        "custom_id",
                        f"duplicate {custom_id!r} (first on line {first_line_of[custom_id]})",
                    )
                )
                continue
            first_line_of[custom_id] = line_no
            if record.get("method", "POST") != "POST":
                problems.append(
                    InputProblem(str(path), line_no, "method", f"{record.get('method')!r} is not supported; use POST")
                )
                continue
            if record.get("url", SUPPORTED_URLS[0]) not in SUPPORTED_URLS:
                problems.append(
                    InputProblem(
                        str(path), line_no, "url", f"{record.get('url')!r} is not supported; use {SUPPORTED_URLS[0]}"
                    )
                )
                continue
            body = record.get("body")
            messages = _check_body(body, (str(path), line_no), problems)
            if messages is None:
                continue
            if body.get("model"):
                foreign_models[str(body["model"])] = foreign_models.get(str(body["model"]), 0) + 1
            if body.get("stream"):
                streamed += 1
            _index(report, custom_id, messages, body, line_offset)
    report.input_hash = f"{HASH_ALGORITHM}:{digest.hexdigest()}"
    if len(problems) >= max_problems:
        report.notes.append(f"stopped listing problems after {max_problems}")
    if foreign_models:
        names = ", ".join(f"{name!r} ({count})" for name, count in sorted(foreign_models.items()))
        report.notes.append(
            f"body.model names another service's model on some lines: {names}; "
            "they are sent to the configured model instead"
        )
    if streamed:
        report.notes.append(
            f"{streamed} line(s) ask for stream: true; batch results are collected whole, "
            "so they run with stream: false"
        )
    return report


def _index(
    report: InputReport, custom_id: str, messages: list[dict[str, Any]], body: dict[str, Any], offset: int
) -> None:
    prefix_text = prefix_of(messages)
    key = prefix_key(prefix_text)
    if key not in report.prefix_offsets:
        report.prefix_offsets[key] = array("q")
        report.prefix_texts[key] = "\n".join(_message_text(m) or "" for m in messages[:-1])
    report.prefix_offsets[key].append(offset)
    user_chars = len(_message_text(messages[-1]) or "")
    report.user_chars.append(user_chars)
    report.max_tokens.append(int(body.get("max_completion_tokens") or body.get("max_tokens") or 0))
    if user_chars > report.longest_request[1]:
        report.longest_request = (custom_id, user_chars)
    report.request_count += 1


INDEX_VERSION = 1


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
    }
    temp = index_path.with_suffix(".tmp")
    temp.write_text(json.dumps(data), "utf-8")
    temp.replace(index_path)


def load_index(index_path: Path, input_path: Path) -> InputReport | None:
    """The saved scan, if it was made of this very file (same path, size and modification time)."""
    if not index_path.exists():
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
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable index is only a missed shortcut: scan again


def clean_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body as it is sent: the configured model replaces a foreign one, and results are never streamed."""
    sent = {key: value for key, value in body.items() if key not in ("model", "stream", "stream_options")}
    return sent


def iter_openai_batch(report: InputReport, done: set[str] | frozenset[str] = frozenset()) -> Iterator[BatchRequest]:
    """Yield the validated requests, prefix group by prefix group (largest first), skipping `done` ids."""
    groups = sorted(report.prefix_offsets.items(), key=lambda item: -len(item[1]))
    with open(report.path, "rb") as handle:
        for key, offsets in groups:
            for offset in offsets:
                handle.seek(offset)
                record = json.loads(handle.readline())
                if record["custom_id"] in done:
                    continue
                yield BatchRequest(record["custom_id"], clean_body(record["body"]), 0, key)


@dataclass
class TableInput:
    """A table (CSV or JSONL) whose rows fill `{column}` fields of a user-message template, under one system prompt."""

    table_path: Path
    system_prompt_path: Path
    template: str
    id_column: str | None = None
    body_defaults: dict[str, Any] = field(default_factory=dict)
    chunk_rows: int = 10_000

    def _chunks(self):
        import pandas as pd

        suffix = self.table_path.suffix.lower()
        try:
            if suffix in (".jsonl", ".ndjson"):
                return pd.read_json(self.table_path, lines=True, chunksize=self.chunk_rows, dtype=False)
            return pd.read_csv(
                self.table_path, chunksize=self.chunk_rows, dtype=str, keep_default_na=False, encoding="utf-8"
            )
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{self.table_path}: cannot read the table ({exc})") from exc

    def template_fields(self) -> list[str]:
        try:
            return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        except ValueError as exc:
            raise UserInputError(f"template: {exc}") from exc

    def system_prompt(self) -> str:
        try:
            return self.system_prompt_path.read_text("utf-8")
        except FileNotFoundError as exc:
            raise UserInputError(f"system prompt file not found: {self.system_prompt_path}") from exc
        except UnicodeDecodeError as exc:
            raise UserInputError(f"{self.system_prompt_path}: not UTF-8 (byte at position {exc.start})") from exc

    def _rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        row_no = 1  # header is line 1 in a CSV; data starts on line 2
        try:
            for chunk in self._chunks():
                for record in chunk.to_dict("records"):
                    row_no += 1
                    yield row_no, record
        except UnicodeDecodeError as exc:
            raise UserInputError(f"{self.table_path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x})") from exc
        except ValueError as exc:
            raise UserInputError(f"{self.table_path}: cannot parse the table ({exc})") from exc

    def _message(self, system: str, row: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": self.template.format(**row)}]

    def scan(self) -> InputReport:
        if not self.table_path.is_file():
            raise UserInputError(f"input table not found: {self.table_path}")
        system = self.system_prompt()
        fields = self.template_fields()
        report = InputReport(path=str(self.table_path))
        digest = hashlib.sha256(system.encode())
        digest.update(self.template.encode())
        with open(self.table_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        seen: dict[str, int] = {}
        path = str(self.table_path)
        checked_columns = False
        for line_no, row in self._rows():
            if not checked_columns:
                missing = [name for name in fields if name not in row]
                if missing:
                    report.problems.append(
                        InputProblem(
                            path,
                            1,
                            "template",
                            f"field(s) {', '.join(missing)} are not "
                            f"columns of the table (columns: {', '.join(map(str, row))})",
                        )
                    )
                    break
                if self.id_column and self.id_column not in row:
                    report.problems.append(InputProblem(path, 1, self.id_column, "id column not in the table"))
                    break
                checked_columns = True
            custom_id = str(row[self.id_column]) if self.id_column else f"row-{line_no - 1}"
            if not custom_id:
                report.problems.append(InputProblem(path, line_no, self.id_column or "id", "empty id"))
                continue
            if custom_id in seen:
                report.problems.append(
                    InputProblem(
                        path,
                        line_no,
                        self.id_column or "id",
                        f"duplicate {custom_id!r} (first on line {seen[custom_id]})",
                    )
                )
                continue
            seen[custom_id] = line_no
            messages = self._message(system, row)
            _index(report, custom_id, messages, self.body_defaults, line_no)
        report.input_hash = f"{HASH_ALGORITHM}:{digest.hexdigest()}"
        return report

    def iter_requests(
        self, report: InputReport, done: set[str] | frozenset[str] = frozenset()
    ) -> Iterator[BatchRequest]:
        system = self.system_prompt()
        key = next(iter(report.prefix_offsets), "")
        for line_no, row in self._rows():
            custom_id = str(row[self.id_column]) if self.id_column else f"row-{line_no - 1}"
            if custom_id in done:
                continue
            body = {**self.body_defaults, "messages": self._message(system, row)}
            yield BatchRequest(custom_id, body, line_no, key)
