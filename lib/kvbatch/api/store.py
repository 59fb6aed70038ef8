"""The batch API's durable store: files and batches in one SQLite database (`--data`/kvbatch.db, WAL journal), the
uploaded bytes beside it in `files/`, each batch's run folder (journal, plan, report) in `batches/<id>/`.

Every change is one committed transaction, so `kill -9` at any moment leaves the state as it was before or after
the change; a batch found `validating`, `in_progress` or `finalizing` at start goes on from its run folder.
"""

from __future__ import annotations

import fcntl
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from kvbatch import defaults
from kvbatch.api.models import ENDED_STATES, BatchObject, FileObject, RequestCounts, WebhookDelivery
from kvbatch.batch.records import ErrorLine, MetricLine
from kvbatch.errors import UserInputError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, path TEXT NOT NULL, seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, event_type TEXT NOT NULL, batch_id TEXT NOT NULL,
    url TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    next_at REAL NOT NULL, last_error TEXT, ended_at REAL, UNIQUE (event_id, url)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
"""
_OUTBOX_FIELDS = ("seq", "event_id", "event_type", "batch_id", "url", "body", "created_at", "state", "attempts",
                  "next_at", "last_error", "ended_at")  # fmt: skip
_OUTBOX_COLUMNS = ", ".join(_OUTBOX_FIELDS)

LIVE_STATES = ("validating", "in_progress", "finalizing", "cancelling")
"""States a restart picks up again: the batch's run folder says what was done."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Store:
    """One connection, used under a lock (callers on an event loop go through `asyncio.to_thread`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.batches_dir = self.root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "kvbatch.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._owner = open(self.root / "kvbatch.lock", "a")  # noqa: SIM115 (held while the store is open)
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._owner.close()
            self._db.close()
            raise UserInputError(f"{self.root} is in use by another `kvbatch api`; give it its own --data") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction (under the lock): a batch's state and the webhook events it causes land
        together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _next_seq(self, table: str) -> int:
        row = self._db.execute(f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}").fetchone()  # noqa: S608 (a name)
        return int(row[0])

    # files

    def add_file(self, file_id: str, filename: str, purpose: str, size: int, path: Path) -> FileObject:
        record = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose)
        with self._lock:
            self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (file_id, filename, purpose, size, record.created_at, str(path),
                              self._next_seq("files")))  # fmt: skip
        return record

    def file(self, file_id: str) -> tuple[FileObject, Path] | None:
        with self._lock:
            row = self._db.execute("SELECT id, filename, purpose, bytes, created_at, path FROM files WHERE id = ?",
                                   (file_id,)).fetchone()  # fmt: skip
        if row is None:
            return None
        return FileObject(id=row[0], filename=row[1], purpose=row[2], bytes=row[3], created_at=row[4]), Path(row[5])

    def files(self, purpose: str | None = None, *, limit: int = 10_000, after: str | None = None,
              order: str = "desc") -> tuple[list[FileObject], bool]:  # fmt: skip
        """A page of files as OpenAI's list does: newest first (`order="asc"`: oldest), `after` the id of the last
        file of the previous page, at most `limit`. Returns (page, has_more)."""
        newest_first = order != "asc"
        where, args = [], []
        if purpose:
            where, args = ["purpose = ?"], [purpose]
        with self._lock:
            if after:
                row = self._db.execute("SELECT seq FROM files WHERE id = ?", (after,)).fetchone()
                where.append("seq < ?" if newest_first else "seq > ?")
                args.append(row[0] if row else (0 if newest_first else -1))
            query = "SELECT id, filename, purpose, bytes, created_at FROM files"
            query += (" WHERE " + " AND ".join(where) if where else "") + (" ORDER BY seq DESC" if newest_first
                                                                         else " ORDER BY seq ASC")  # fmt: skip
            rows = self._db.execute(query + " LIMIT ?", (*args, limit + 1)).fetchall()
        page = [FileObject(id=r[0], filename=r[1], purpose=r[2], bytes=r[3], created_at=r[4]) for r in rows]
        return page[:limit], len(page) > limit

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # batches

    def add_batch(self, batch: BatchObject) -> None:
        with self._lock:
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?)",
                             (batch.id, self._next_seq("batches"), batch.model_dump_json()))  # fmt: skip

    def save_batch(self, batch: BatchObject, *, keep_cancel: bool = False, deliveries: Iterable[WebhookDelivery] = (),
                   refuse_from: tuple[str, ...] = ENDED_STATES) -> bool:  # fmt: skip
        """Write the record, and the webhook events this state causes, in one transaction. Nothing is written over a
        stored state in `refuse_from` (an ended batch stays ended; a cancel does not land on a finalizing one):
        returns False then, with `batch` left as it was. With `keep_cancel`, a `cancelling` already stored (the
        API's, written meanwhile) is kept over a live state in `batch`."""
        with self._transaction() as db:
            row = db.execute("SELECT body FROM batches WHERE id = ?", (batch.id,)).fetchone()
            stored = BatchObject.model_validate_json(row[0]) if row else None
            if stored is not None and stored.status in refuse_from:
                return False
            if keep_cancel and stored is not None and batch.status in ("validating", "in_progress") and (
                    stored.status == "cancelling"):  # fmt: skip
                batch.status, batch.cancelling_at = stored.status, stored.cancelling_at
            db.execute("UPDATE batches SET body = ? WHERE id = ?", (batch.model_dump_json(), batch.id))
            for delivery in deliveries:
                db.execute("INSERT OR IGNORE INTO outbox (event_id, event_type, batch_id, url, body, created_at, "
                           "state, attempts, next_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
                           (delivery.event_id, delivery.event_type, delivery.batch_id, delivery.url, delivery.body,
                            delivery.created_at, delivery.next_at))  # fmt: skip
            return True

    def batch(self, batch_id: str) -> BatchObject | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return BatchObject.model_validate_json(row[0]) if row else None

    def batches(self, *, limit: int = 20, after: str | None = None) -> tuple[list[BatchObject], bool]:
        """Newest first; `after` is the id of the last batch of the previous page. Returns (page, has_more)."""
        with self._lock:
            if after:
                row = self._db.execute("SELECT seq FROM batches WHERE id = ?", (after,)).fetchone()
                start = row[0] if row else 0
                rows = self._db.execute("SELECT body FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                                        (start, limit + 1)).fetchall()  # fmt: skip
            else:
                rows = self._db.execute("SELECT body FROM batches ORDER BY seq DESC LIMIT ?", (limit + 1,)).fetchall()
        page = [BatchObject.model_validate_json(r[0]) for r in rows]
        return page[:limit], len(page) > limit

    def live_batch_using(self, file_id: str) -> str | None:
        """A batch not yet ended whose input is `file_id` (its file must stay)."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM batches").fetchall()
        for (body,) in rows:
            batch = BatchObject.model_validate_json(body)
            if batch.input_file_id == file_id and batch.status in LIVE_STATES:
                return batch.id
        return None

    def next_to_run(self) -> BatchObject | None:
        """The oldest batch not yet ended: one runs at a time, the others wait in order."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM batches ORDER BY seq ASC").fetchall()
        for (body,) in rows:
            batch = BatchObject.model_validate_json(body)
            if batch.status in LIVE_STATES:
                return batch
        return None

    def batch_folder(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id

    # the webhook outbox

    def due_deliveries(self, now: float) -> list[WebhookDelivery]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' AND next_at <= ? "
                                    "ORDER BY next_at", (now,)).fetchall()  # fmt: skip  # noqa: S608 (constant)
        return [_delivery(row) for row in rows]

    def next_delivery_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM outbox WHERE state = 'pending'").fetchone()
        return row[0]

    def deliveries(self, limit: int = 100) -> list[WebhookDelivery]:
        """The newest deliveries not yet delivered, then the newest delivered, at most `limit` (the status page)."""
        with self._lock:
            return _newest_deliveries(self._db, limit)

    def delivery_counts(self) -> dict[str, int]:
        """How many deliveries are pending, delivered, given up: over the whole outbox."""
        with self._lock:
            return _delivery_counts(self._db)

    def record_attempt(self, delivery: WebhookDelivery) -> None:
        """An attempt's outcome: its state, count, next time and last error (the delivery as the courier left it)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET state = ?, attempts = ?, next_at = ?, last_error = ?, ended_at = ? "
                             "WHERE seq = ?", (delivery.state, delivery.attempts, delivery.next_at,
                                               delivery.last_error, delivery.ended_at, delivery.seq))  # fmt: skip


def _delivery(row: tuple) -> WebhookDelivery:
    return WebhookDelivery(**dict(zip(_OUTBOX_FIELDS, row, strict=True)))


def read_outbox(root: Path, limit: int = 100) -> tuple[dict[str, int], list[WebhookDelivery]]:
    """A store's outbox counts and newest deliveries (the undelivered first), read-only and without the store's lock
    (a running `kvbatch api` holds that), for `kvbatch webhooks`."""
    path = Path(root) / "kvbatch.db"
    if not path.exists():
        raise UserInputError(f"{root}: no kvbatch api store here (no kvbatch.db); give the folder passed as --data")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'outbox'").fetchone():
            return _delivery_counts(None), []  # a store from before the outbox
        return _delivery_counts(db), _newest_deliveries(db, limit)
    finally:
        db.close()


def _newest_deliveries(db: sqlite3.Connection, limit: int) -> list[WebhookDelivery]:
    rows = db.execute(f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY state = 'delivered', seq DESC LIMIT ?",
                      (limit,)).fetchall()  # fmt: skip  # noqa: S608 (constant)
    return [_delivery(row) for row in rows]


def _delivery_counts(db: sqlite3.Connection | None) -> dict[str, int]:
    counts = dict.fromkeys(("pending", "delivered", "given_up"), 0)
    for state, count in db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall() if db else ():
        counts[state] = count
    return counts



class RunProgress:
    """A batch's progress read from its run folder as the journal grows: only the bytes appended since the last
    read (a 170,000-line results file is hundreds of MB; polling must not read it again every second)."""

    def __init__(self, results: Path, errors: Path, metrics: Path,
                 keep_failures: int = defaults.API_PAGE_FAILURES) -> None:  # fmt: skip
        self._offsets = {results: 0, errors: 0, metrics: 0}
        self.results, self.errors, self.metrics = results, errors, metrics
        self.completed = self.failed = 0
        self.prompt_tokens = self.cached_tokens = 0
        self.keep_failures = keep_failures
        self.failures: list[dict[str, str]] = []
        """The first failed requests: custom_id, code and message (the status page lists them)."""

    def _new_lines(self, path: Path):
        """The whole lines appended since the last read, a MiB at a time (a line still being written waits)."""
        if not path.exists():
            return
        with open(path, "rb") as handle:
            handle.seek(self._offsets[path])
            rest = b""
            for block in iter(lambda: handle.read(1 << 20), b""):
                data = rest + block
                cut = data.rfind(b"\n") + 1
                whole, rest = data[:cut], data[cut:]
                self._offsets[path] += len(whole)
                yield from whole.splitlines()

    def read(self) -> None:
        self.completed += sum(1 for _ in self._new_lines(self.results))
        for line in self._new_lines(self.errors):
            self.failed += 1
            if len(self.failures) < self.keep_failures:
                self.failures.append(_failure(line))
        for line in self._new_lines(self.metrics):
            try:
                record = cast(MetricLine, json.loads(line))
            except ValueError:
                continue
            self.prompt_tokens += record["prompt_tokens"] or 0
            self.cached_tokens += record["cached_tokens"] or 0

    def counts(self, total: int) -> RequestCounts:
        return RequestCounts(total=total, completed=self.completed, failed=self.failed)

    @property
    def cache_share(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


def _failure(line: bytes) -> dict[str, str]:
    """An errors.jsonl line (OpenAI's batch error line) as the page lists it."""
    try:
        record = cast(ErrorLine, json.loads(line))
    except ValueError:
        return {"custom_id": "?", "code": "", "message": "an unreadable line in errors.jsonl"}
    error = record["error"]
    return {"custom_id": record["custom_id"], "code": error.get("code", ""), "message": error.get("message", "")}
