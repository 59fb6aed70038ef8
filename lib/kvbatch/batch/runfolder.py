"""The run folder: every file in it is named here, one writer holds it at a time, and its fingerprint says which
run it belongs to.

    data/runs/<run>/
      run.json            fingerprint and journal version (written once, fsynced with its folder)
      results.jsonl       one line per request that succeeded (OpenAI Batch output format)
      errors.jsonl        one line per request that failed for good
      errors-history.jsonl earlier errors of requests sent again with --retry-failed
      plan.json           the plan (batch/plan/plan.py's typed model)
      summary.json        the run's summary (typed model, written at the end of each invocation)
      answers.csv         the answers as one table, a row per custom_id (`kvbatch run` writes it at each end)
      metrics.jsonl       one line per finished request: latency, tokens, cache hits, endpoint
      events.jsonl        recoveries, back-offs, concurrency trials, memory reactions
      memory.csv          the server's memory over time
      input-index.json    the validated input's index, so a resume skips re-reading it
      server.log          the embedded server's log (all restarts)
      .lock               held (flock) by the one process writing here
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbatch import defaults
from kvbatch.batch.records import event_line
from kvbatch.errors import UserInputError

RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"
ERRORS_HISTORY_FILE = "errors-history.jsonl"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
ANSWERS_TABLE = "answers.csv"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
MEMORY_FILE = "memory.csv"
INDEX_FILE = "input-index.json"
SERVER_LOG = "server.log"
LOCK_FILE = ".lock"


class RunFolderBusyError(UserInputError):
    """Another kvbatch process is writing this run folder."""


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @classmethod
    def named(cls, name_or_path: str | Path | None, input_path: Path | None = None) -> RunFolder:
        """`--run NAME` under data/runs, a path as given, or (no name) the input file's stem under data/runs."""
        if name_or_path is None:
            if input_path is None:
                raise UserInputError("name the run (--run NAME)")
            return cls(defaults.RUNS_DIR / Path(input_path).stem)
        candidate = Path(name_or_path)
        if candidate.is_absolute() or len(candidate.parts) > 1 or candidate.exists():
            return cls(candidate)
        return cls(defaults.RUNS_DIR / candidate)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def errors(self) -> Path:
        return self.path / ERRORS_FILE

    @property
    def errors_history(self) -> Path:
        return self.path / ERRORS_HISTORY_FILE

    @property
    def plan(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def answers_table(self) -> Path:
        return self.path / ANSWERS_TABLE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def events(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def memory(self) -> Path:
        return self.path / MEMORY_FILE

    @property
    def index(self) -> Path:
        return self.path / INDEX_FILE

    @property
    def server_log(self) -> Path:
        return self.path / SERVER_LOG

    def append_event(self, kind: str, **details: Any) -> None:
        """One line in events.jsonl (recoveries, back-offs, trials): the one place that writes it."""
        with open(self.events, "a", encoding="utf-8") as handle:
            handle.write(event_line(kind, **details))

    def is_run(self) -> bool:
        return self.run_file.exists()

    def has_output(self) -> bool:
        return any(p.exists() and p.stat().st_size for p in (self.results, self.errors))


class RunLock:
    """An exclusive flock on the folder's `.lock`, released by the OS when the holder dies (kill -9 included)."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.folder.path.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderBusyError(
                f"{self.folder.path} is being written by kvbatch process {holder}; wait for it to finish or stop it "
                "(one writer per run folder)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves the old file or the new one, never a mix: write a temp
    file, fsync it, rename, fsync the folder."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json(path: Path, data: Any) -> None:
    write_durably(path, json.dumps(data, indent=2, default=str))
