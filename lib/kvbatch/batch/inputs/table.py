"""A table input: rows of a CSV or JSONL table fill the `{column}` fields of a user-message template, under one
system prompt file. The table's bytes, the system prompt, the template and the id column make its fingerprint."""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbatch.batch.inputs.requests import HASH_ALGORITHM, BatchRequest, InputProblem, InputReport, not_utf8
from kvbatch.errors import UserInputError


@dataclass
class TableInput:
    """A table (CSV or JSONL) whose rows fill `{column}` fields of a user-message template, under one system prompt."""

    table_path: Path
    system_prompt_path: Path
    template: str
    id_column: str | None = None
    body_defaults: dict[str, Any] = field(default_factory=dict)
    read_rows: int = 10_000
    """Rows pandas reads at a time: memory stays flat whatever the table's size."""

    def _frames(self):
        import pandas as pd

        suffix = self.table_path.suffix.lower()
        try:
            if suffix in (".jsonl", ".ndjson"):
                return pd.read_json(self.table_path, lines=True, chunksize=self.read_rows, dtype=False)
            return pd.read_csv(self.table_path, chunksize=self.read_rows, dtype=str, keep_default_na=False,
                               encoding="utf-8-sig")  # fmt: skip
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{self.table_path}: cannot read the table ({exc})") from exc

    def template_fields(self) -> list[str]:
        """The column names the template uses; a format spec, a conversion or an attribute is refused up front."""
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise UserInputError(f"template: {exc} (write literal braces as {{{{ and }}}})") from exc
        names = []
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name or name.isdigit() or any(c in name for c in ".["):
                raise UserInputError(f"template: field {{{name}}} must name a column, like {{cv}}")
            if spec or conversion:
                shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                raise UserInputError(f"template: field {{{shown}}} has a format; use plain {{{name}}}")
            names.append(name)
        return names

    def system_prompt(self) -> str:
        try:
            return self.system_prompt_path.read_text("utf-8-sig")
        except FileNotFoundError as exc:
            raise UserInputError(f"system prompt file not found: {self.system_prompt_path}") from exc
        except UnicodeDecodeError as exc:
            raise UserInputError(f"{self.system_prompt_path}: not UTF-8 (byte at position {exc.start})") from exc

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        row_no = 1  # header is line 1 in a CSV; data starts on line 2
        try:
            for frame in self._frames():
                for record in frame.to_dict("records"):
                    row_no += 1
                    yield row_no, record
        except UnicodeDecodeError as exc:
            raise UserInputError(f"{self.table_path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x})") from exc
        except ValueError as exc:
            raise UserInputError(f"{self.table_path}: cannot parse the table ({exc})") from exc

    def _messages(self, system: str, row: dict[str, Any]) -> list[dict[str, str]]:
        user = self.template.format(**{key: "" if value is None else value for key, value in row.items()})
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def custom_id(self, line_no: int, row: dict[str, Any]) -> str:
        return str(row[self.id_column]) if self.id_column else f"row-{line_no - 1}"

    def scan(self) -> InputReport:
        if not self.table_path.is_file():
            raise UserInputError(f"input table not found: {self.table_path}")
        system = self.system_prompt()
        fields = self.template_fields()
        path = str(self.table_path)
        report = InputReport(path=path)
        why = not_utf8(system)
        if why:
            report.problems.append(InputProblem(str(self.system_prompt_path), 1, "(file)", why))
            return report
        digest = hashlib.sha256(system.encode())
        digest.update(self.template.encode("utf-8", "surrogatepass"))
        digest.update(f"\0id_column={self.id_column or ''}\0".encode())
        if self.body_defaults:  # a --schema is part of what the run asks
            digest.update(json.dumps(self.body_defaults, sort_keys=True).encode())
        with open(self.table_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        seen: dict[str, int] = {}
        checked_columns = False
        for line_no, row in self.rows():
            if not checked_columns:
                missing = [name for name in fields if name not in row]
                if missing:
                    report.problems.append(InputProblem(path, 1, "template", f"field(s) {', '.join(missing)} are not "
                                           f"columns of the table (columns: {', '.join(map(str, row))})"))  # fmt: skip
                    break
                if self.id_column and self.id_column not in row:
                    report.problems.append(InputProblem(path, 1, self.id_column, "id column not in the table"))
                    break
                checked_columns = True
            custom_id = self.custom_id(line_no, row)
            name = self.id_column or "id"
            if not custom_id:
                report.problems.append(InputProblem(path, line_no, name, "empty id"))
                continue
            if custom_id in seen:
                report.problems.append(
                    InputProblem(path, line_no, name, f"duplicate {custom_id!r} (first on line {seen[custom_id]})")
                )
                continue
            seen[custom_id] = line_no
            messages = self._messages(system, row)
            why = not_utf8(custom_id) or not_utf8(messages[-1]["content"])
            if why:
                report.problems.append(InputProblem(path, line_no, name, why))
                continue
            report.add(custom_id, messages, self.body_defaults, line_no)
        report.input_hash = f"{HASH_ALGORITHM}:{digest.hexdigest()}"
        return report

    def iter_requests(
        self, report: InputReport, done: set[str] | frozenset[str] = frozenset()
    ) -> Iterator[BatchRequest]:
        system = self.system_prompt()
        key = next(iter(report.prefix_offsets), "")
        for line_no, row in self.rows():
            custom_id = self.custom_id(line_no, row)
            if custom_id in done:
                continue
            yield BatchRequest(custom_id, {**self.body_defaults, "messages": self._messages(system, row)}, line_no, key)
