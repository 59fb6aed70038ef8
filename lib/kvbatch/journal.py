"""The run's checkpoint: append-only result files that are also the journal, plus a versioned fingerprint.

`results.jsonl` and `errors.jsonl` are only ever appended to, one whole line per write(2), and fsynced at
least once per chunk. On resume every `custom_id` already in either file is skipped, so each request
has exactly one line in total; a torn last line (a crash mid-write) is cut off before appending.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbatch.errors import UserInputError

JOURNAL_VERSION = 1
RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"
FINGERPRINT_FILE = "run.json"
_CUSTOM_ID_KEY = '"custom_id": '
_decoder = json.JSONDecoder()


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
            # longer than 1 MiB without a newline: walk back further
            handle.seek(0)
            keep = handle.read(size).rfind(b"\n") + 1
        handle.truncate(keep)
        return size - keep


def completed_ids(path: Path) -> set[str]:
    """Every `custom_id` in a result file. Reads only the id of each line (it is written near the front)."""
    done: set[str] = set()
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            at = line.find(_CUSTOM_ID_KEY)
            if at < 0:
                continue
            try:
                value, _ = _decoder.raw_decode(line, at + len(_CUSTOM_ID_KEY))
            except json.JSONDecodeError:
                continue
            done.add(value)
    return done


@dataclass
class Fingerprint:
    """What makes two invocations the same run. A resume with a different one is refused."""

    input_hash: str
    model: str
    system_prompt_hash: str
    generation: dict[str, Any]
    mode: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_hash": self.input_hash,
            "model": self.model,
            "system_prompt_hash": self.system_prompt_hash,
            "generation": self.generation,
            "mode": self.mode,
        }

    def differences(self, stored: dict[str, Any]) -> list[str]:
        mine = self.as_dict()
        return [f"{key}: was {stored.get(key)!r}, now {mine[key]!r}" for key in mine if stored.get(key) != mine[key]]


class Journal:
    """Appends result and error lines for one run folder. Open with `Journal.open(run_dir, fingerprint)`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.results_path = run_dir / RESULTS_FILE
        self.errors_path = run_dir / ERRORS_FILE
        self._fds: dict[str, int] = {}
        self._unsynced = 0
        self.done: set[str] = set()
        self.resumed = False
        self.repaired_bytes = 0

    @classmethod
    def open(cls, run_dir: Path, fingerprint: Fingerprint) -> Journal:
        run_dir.mkdir(parents=True, exist_ok=True)
        journal = cls(run_dir)
        meta_path = run_dir / FINGERPRINT_FILE
        if meta_path.exists():
            stored = json.loads(meta_path.read_text("utf-8"))
            if stored.get("journal_version", 0) > JOURNAL_VERSION:
                raise UserInputError(
                    f"{meta_path}: written by a newer kvbatch (journal version "
                    f"{stored.get('journal_version')}); upgrade kvbatch to resume it"
                )
            changed = fingerprint.differences(stored.get("fingerprint", {}))
            if changed:
                raise UserInputError(
                    f"{run_dir} holds a run with a different fingerprint, so it cannot be resumed with this command "
                    f"({'; '.join(changed)}). Use another --run name, or restore the original settings."
                )
            journal.resumed = True
        else:
            meta = {
                "journal_version": JOURNAL_VERSION,
                "created_unix_s": time.time(),
                "fingerprint": fingerprint.as_dict(),
            }
            temp = meta_path.with_suffix(".tmp")
            temp.write_text(json.dumps(meta, indent=2), "utf-8")
            os.replace(temp, meta_path)
        for path in (journal.results_path, journal.errors_path):
            journal.repaired_bytes += _repair_torn_tail(path)
            journal.done |= completed_ids(path)
        return journal

    def _fd(self, path: Path) -> int:
        key = str(path)
        if key not in self._fds:
            self._fds[key] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fds[key]

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        os.write(self._fd(path), data)  # one write(2) per line: a kill leaves whole lines, or a torn last one
        self._unsynced += 1

    def record_result(self, custom_id: str, response_body: dict[str, Any], *, status_code: int = 200) -> None:
        """One success line in the OpenAI Batch output format."""
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        self._append(
            self.results_path,
            {
                "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                "custom_id": custom_id,
                "response": {"status_code": status_code, "request_id": request_id, "body": response_body},
                "error": None,
            },
        )
        self.done.add(custom_id)

    def record_error(
        self, custom_id: str, code: str, message: str, *, attempts: int, status_code: int | None = None
    ) -> None:
        """One line for a request that failed for good: the reason and how many attempts it had."""
        self._append(
            self.errors_path,
            {
                "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                "custom_id": custom_id,
                "response": {"status_code": status_code, "body": None} if status_code else None,
                "error": {"code": code, "message": message},
                "attempts": attempts,
            },
        )
        self.done.add(custom_id)

    def sync(self) -> None:
        """fsync both files; called at least once per chunk and at the end."""
        for fd in self._fds.values():
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
