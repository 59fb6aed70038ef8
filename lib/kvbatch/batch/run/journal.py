"""The run's checkpoint: append-only result files that are also the journal, plus a versioned fingerprint.

`results.jsonl` and `errors.jsonl` are only ever appended to, one whole line per write(2), and fsynced at least
once per chunk. On resume every `custom_id` already in either file is skipped, so each request has exactly one
line in total; a torn last line (a crash mid-write) is cut off before appending, by the one process that holds
the folder's lock. `--retry-failed` moves the failed requests' lines to `errors-history.jsonl` first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kvbatch import jsoncodec
from kvbatch.batch import records
from kvbatch.batch.records import ErrorLine, ResultLine, custom_ids, error_line, result_line
from kvbatch.batch.runfolder import RunFolder, write_durably
from kvbatch.errors import UserInputError

JOURNAL_VERSION = 2


def _repair_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (a write interrupted by a crash). Returns the bytes cut."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        block = min(size, 1 << 20)
        handle.seek(size - block)
        tail = handle.read(block)
        if tail.endswith(b"\n"):
            return 0
        cut_at = tail.rfind(b"\n")
        keep = size - block + cut_at + 1 if cut_at >= 0 else 0
        if cut_at < 0 and block < size:
            handle.seek(0)  # longer than 1 MiB without a newline: walk back further
            keep = handle.read(size).rfind(b"\n") + 1
        handle.truncate(keep)
        return size - keep


class Fingerprint(BaseModel):
    """What makes two invocations the same run. A resume with a different one is refused, naming what changed."""

    input_hash: str
    """`sha256:` of the input bytes (a table: with its system prompt, template and id column)."""
    model: str
    """Backend, model identity and KV cache types, e.g. `embedded:gemma3-270m.gguf:f16-f16`."""
    system_prompt_hash: str
    generation: dict[str, Any]
    mode: str

    def differences(self, stored: dict[str, Any]) -> list[str]:
        mine = self.model_dump()
        return [f"{key}: was {stored.get(key)!r}, now {mine[key]!r}" for key in mine if stored.get(key) != mine[key]]


class InputSource(BaseModel):
    """Where the run's requests came from: an export joins a table input's own columns back on its id column."""

    path: str
    table: bool = False
    id_column: str | None = None


@dataclass
class JournalState:
    """The ids a run folder's journal already holds, read once per invocation."""

    done: set[str]
    """Every id with a line in results.jsonl or errors.jsonl."""
    failed: set[str]
    repaired_bytes: int = 0
    """Bytes of a torn last line cut (a crash mid-write)."""


class RunRecord(BaseModel):
    """run.json."""

    journal_version: int = JOURNAL_VERSION
    created_unix_s: float
    fingerprint: Fingerprint
    input: InputSource | None = None

    @classmethod
    def read(cls, path: Path) -> RunRecord | None:
        """run.json, or None where there is none (or it is not one kvbatch can read)."""
        try:
            return cls.model_validate_json(path.read_text("utf-8")) if path.exists() else None
        except ValueError:
            return None


class Journal:
    """Appends result and error lines for one run folder. Open with `Journal.open(folder, fingerprint)` while
    holding the folder's lock."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.results_path = folder.results
        self.errors_path = folder.errors
        self._fds: dict[str, int] = {}
        self._unsynced = 0
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.resumed = False
        self.repaired_bytes = 0

    @classmethod
    def state(cls, folder: RunFolder, fingerprint: Fingerprint) -> JournalState:
        """What a run folder already holds, read once, while holding its lock and before anything is planned: its
        fingerprint checked (a different run is refused), a torn last line cut, and the ids done and failed.
        `open(..., state=...)` then starts from it without reading the files again."""
        repaired = 0
        if folder.run_file.exists():  # a run of ours: its files are ours to repair (others' are refused in `open`)
            cls._check(folder, fingerprint)
            repaired = sum(_repair_torn_tail(path) for path in (folder.results, folder.errors))
        failed = custom_ids(folder.errors)
        return JournalState(custom_ids(folder.results) | failed, failed, repaired)

    @staticmethod
    def _check(folder: RunFolder, fingerprint: Fingerprint) -> None:
        """run.json's fingerprint against this invocation's: a different run cannot be resumed."""
        try:
            stored = json.loads(folder.run_file.read_text("utf-8"))
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{folder.run_file}: not valid JSON ({exc}); it is not a run folder") from exc
        if stored.get("journal_version", 0) > JOURNAL_VERSION:
            raise UserInputError(
                f"{folder.run_file}: written by a newer kvbatch (journal version "
                f"{stored.get('journal_version')}); upgrade kvbatch to resume it"
            )
        changed = fingerprint.differences(stored.get("fingerprint", {}))
        if changed:
            raise UserInputError(
                f"{folder.path} holds a run with a different fingerprint, so it cannot be resumed with this "
                f"command ({'; '.join(changed)}). Use another --run name, or restore the original settings."
            )

    @classmethod
    def open(cls, folder: RunFolder | Path, fingerprint: Fingerprint, source: InputSource | None = None, *,
             state: JournalState | None = None) -> Journal:  # fmt: skip
        """Open the folder's journal (run.json written for a new run); `state`: what `Journal.state` read under the
        same lock, so the result files are not read again."""
        folder = folder if isinstance(folder, RunFolder) else RunFolder(Path(folder))
        folder.path.mkdir(parents=True, exist_ok=True)
        journal = cls(folder)
        if not folder.run_file.exists() and folder.has_output():
            raise UserInputError(
                f"{folder.path} has results but no {folder.run_file.name}, so nothing says which run they belong "
                "to; move them away or use another --run name"
            )
        state = state or cls.state(folder, fingerprint)  # a run resumed: its fingerprint checked there
        if folder.run_file.exists():
            journal.resumed = True
        else:
            record = RunRecord(created_unix_s=time.time(), fingerprint=fingerprint, input=source)
            write_durably(folder.run_file, record.model_dump_json(indent=2))
        journal.done, journal.failed, journal.repaired_bytes = state.done, state.failed, state.repaired_bytes
        return journal

    def retry_failed(self) -> int:
        """Make the requests in errors.jsonl due again: their lines move to errors-history.jsonl (kept, with the
        time they were retried), and errors.jsonl is replaced without them. Returns how many."""
        if not self.failed:
            return 0
        self.close()
        with open(self.folder.errors_history, "a", encoding="utf-8", errors="surrogatepass") as history:
            for record in records.errors(self.errors_path):
                history.write(json.dumps({**record, "retried_unix_s": time.time()}, ensure_ascii=False) + "\n")
            history.flush()
            os.fsync(history.fileno())
        write_durably(self.errors_path, "")
        count = len(self.failed)
        self.done -= self.failed
        self.failed = set()
        return count

    def _fd(self, path: Path) -> int:
        key = str(path)
        if key not in self._fds:
            self._fds[key] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fds[key]

    def _append(self, path: Path, record: ResultLine | ErrorLine) -> None:
        data = jsoncodec.dumps_line(record)
        os.write(self._fd(path), data)  # one write(2) per line: a kill leaves whole lines, or a torn last one
        self._unsynced += 1

    def record_result(self, custom_id: str, response_body: dict[str, Any], *, status_code: int = 200) -> None:
        """One success line in the OpenAI Batch output format."""
        self._append(self.results_path, result_line(custom_id, response_body, status_code))
        self.done.add(custom_id)

    def record_error(self, custom_id: str, code: str, message: str, *, attempts: int, status_code: int | None = None,
                     details: dict[str, Any] | None = None) -> None:  # fmt: skip
        """One line for a request that failed for good: the reason and how many attempts it had."""
        self._append(self.errors_path, error_line(custom_id, code, message, attempts=attempts,
                                                  status_code=status_code, details=details))  # fmt: skip
        self.done.add(custom_id)
        self.failed.add(custom_id)

    def sync(self) -> None:
        """fsync both files; called at least once per chunk and at the end."""
        for fd in list(self._fds.values()):  # a copy: the recorder fsyncs from a thread while a file may open
            os.fsync(fd)
        self._unsynced = 0

    @property
    def unsynced(self) -> int:
        return self._unsynced

    def close(self) -> None:
        if self._fds:
            self.sync()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
