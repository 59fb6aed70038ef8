"""Runs the API's batches one at a time, in the order they were created, through the same runner, journal and
report as `kvbatch run` (each batch's run folder is `--data`/batches/<id>): validation, the plan, the run,
`request_counts` while it runs, the output files, cancellation, and on a restart the batch in progress goes on.

A run that stops because its servers are gone (past `--max-wait`) is not a failed batch: nothing it did is lost and
waiting would serve the rest, so the batch stays `in_progress` and is taken up again after a pause. A batch that can
never run (its plan does not fit, its model is missing, its key is refused) fails with the reason, so the batches
behind it go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import replace
from pathlib import Path

from kvbatch import defaults
from kvbatch.api.models import ENDED_STATES, BatchErrorData, BatchErrors, BatchObject
from kvbatch.api.store import RunProgress, Store, new_id
from kvbatch.api.webhooks import Webhooks
from kvbatch.batch.inputs.openai_batch import save_index
from kvbatch.batch.plan.plan_record import read_plan
from kvbatch.batch.records import last_memory_sample
from kvbatch.batch.run.runner import field_rules, load_input, run_batch_async, run_specs
from kvbatch.batch.run.summary import Summary
from kvbatch.batch.runfolder import RunFolder
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import KvbatchError, TransientError

log = logging.getLogger("kvbatch.api")


class BatchWorker:
    def __init__(self, store: Store, settings: BatchSettings, *, webhooks: Webhooks | None = None,
                 report: bool = True, count_every_s: float = defaults.API_COUNT_EVERY_S) -> None:  # fmt: skip
        self.store = store
        self.settings = settings
        self.webhooks = webhooks
        self.report = report
        self.count_every_s = count_every_s
        self.wake = asyncio.Event()
        self.running_id: str | None = None
        self._cancelled: set[str] = set()
        self._run_task: asyncio.Task | None = None
        self._rendering = asyncio.Lock()

    def run_folder(self, batch_id: str) -> RunFolder:
        return RunFolder(self.store.batch_folder(batch_id))

    def cancel(self, batch_id: str) -> None:
        """Ask the running batch to stop (what it did is kept, as its output); a waiting one ends at once."""
        self._cancelled.add(batch_id)
        if self.running_id == batch_id and self._run_task is not None:
            self._run_task.cancel()
        self.wake.set()

    async def _save(self, batch: BatchObject) -> None:
        """Save, keeping a cancel that arrived meanwhile (the API writes `cancelling` on its own record); the webhook
        events an end causes are saved with it, in the same transaction, then sent."""
        deliveries = self.webhooks.deliveries_for(batch) if self.webhooks is not None else []
        saved = await asyncio.to_thread(functools.partial(self.store.save_batch, batch, keep_cancel=True,
                                                          deliveries=deliveries))  # fmt: skip
        if not saved:  # it ended meanwhile (cancelled while it waited): go on from what is stored
            stored = await asyncio.to_thread(self.store.batch, batch.id)
            for name in BatchObject.model_fields if stored is not None else ():
                setattr(batch, name, getattr(stored, name))
        elif deliveries and self.webhooks is not None:
            self.webhooks.wake()

    async def forever(self) -> None:
        while True:
            batch = await asyncio.to_thread(self.store.next_to_run)
            if batch is None:
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 5.0)
                continue
            try:
                await self.take(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (one batch's trouble must not end the service)
                log.exception("batch %s: %s", batch.id, exc)
                troubles = int(batch.x_kvbatch.get("troubles", 0)) + 1
                batch.x_kvbatch.update(last_stop=f"{type(exc).__name__}: {exc}"[:500], troubles=troubles)
                if troubles >= defaults.API_MAX_TROUBLES:
                    await self._fail(batch, "internal_error", f"{type(exc).__name__}: {exc}"[:500])
                else:
                    await self._save(batch)
                    await asyncio.sleep(defaults.API_RETRY_PAUSE_S)

    async def take(self, batch: BatchObject) -> None:
        """Carry one batch from where its record says it is to an end (or to a stop that a later pass resumes)."""
        if batch.status == "validating":
            batch = await self._validate(batch)
        if batch.status in ENDED_STATES:  # its input refused (the event went with it), or cancelled while it waited
            self._cancelled.discard(batch.id)
            return
        if batch.status == "cancelling" or batch.id in self._cancelled:
            await self._finish(batch, cancelled=True)
            return
        if batch.status == "in_progress":
            stopped = await self._run(batch)
            if stopped is not None and batch.id not in self._cancelled:
                if not isinstance(stopped, TransientError):  # it can never run as it is: the queue goes on
                    await self._fail(batch, type(stopped).__name__, str(stopped)[:1000])
                    return
                batch.x_kvbatch["last_stop"] = str(stopped)[:500]
                await self._save(batch)
                await asyncio.sleep(defaults.API_RETRY_PAUSE_S)
                return
        await self._finish(batch, cancelled=batch.id in self._cancelled)

    async def _fail(self, batch: BatchObject, code: str, message: str) -> None:
        batch.status, batch.failed_at = "failed", int(time.time())
        batch.errors = BatchErrors(data=[BatchErrorData(code=code, message=message)])
        await self._collect(batch)
        await self._ended(batch)

    async def _collect(self, batch: BatchObject) -> None:
        """The final request_counts, and file records for what the run wrote."""
        folder = self.run_folder(batch.id)
        progress = RunProgress(folder.results, folder.errors, folder.metrics)
        await asyncio.to_thread(progress.read)
        batch.request_counts = progress.counts(batch.request_counts.total)
        batch.output_file_id = await self._output_file(batch, folder.results, "output")
        batch.error_file_id = await self._output_file(batch, folder.errors, "errors")

    def _settings(self, batch: BatchObject, input_path: Path) -> BatchSettings:
        return replace(self.settings, input_path=input_path, folder=self.run_folder(batch.id), progress=False)

    async def _validate(self, batch: BatchObject) -> BatchObject:
        found = await asyncio.to_thread(self.store.file, batch.input_file_id)
        problems: list[BatchErrorData] = []
        total = 0
        if found is None:
            problems.append(BatchErrorData(code="missing_file", message=f"input file {batch.input_file_id} is gone",
                                           param="input_file_id"))  # fmt: skip
        else:
            report = await asyncio.to_thread(self._scan, self._settings(batch, found[1]))
            total = report.request_count
            problems = [BatchErrorData(code="invalid_request", message=f"{p.field}: {p.reason}", param=p.field,
                                       line=p.line_no) for p in report.problems]  # fmt: skip
            if not problems and not total:
                problems.append(BatchErrorData(code="empty_file", message="the input file holds no requests"))
        now = int(time.time())
        if problems:
            batch.status, batch.failed_at = "failed", now
            batch.errors = BatchErrors(data=problems)
        else:
            batch.status, batch.in_progress_at = "in_progress", now
            batch.request_counts.total = total
        await self._save(batch)
        return batch

    @staticmethod
    def _scan(settings: BatchSettings):
        """Validate the input as `kvbatch run` does, and keep its index in the run folder: the run reads it back
        instead of scanning a 2 GiB file again."""
        report, _ = load_input(settings, field_rules(run_specs(settings)))
        if not report.problems:
            settings.folder.path.mkdir(parents=True, exist_ok=True)
            save_index(report, settings.folder.index)
        return report

    async def _run(self, batch: BatchObject) -> KvbatchError | None:
        """The run itself; returns why it stopped before every request had an outcome (None: it ended)."""
        found = await asyncio.to_thread(self.store.file, batch.input_file_id)
        if found is None:
            return KvbatchError(f"the input file {batch.input_file_id} was deleted")
        settings = self._settings(batch, found[1])
        folder = settings.folder
        folder.path.parent.mkdir(parents=True, exist_ok=True)
        said: list[str] = []

        def say(text: str) -> None:
            said.append(text)
            if text.startswith("plan "):
                batch.x_kvbatch["plan"] = text

        self.running_id = batch.id
        self._run_task = asyncio.create_task(run_batch_async(settings, say=say))
        progress = RunProgress(folder.results, folder.errors, folder.metrics)
        await asyncio.to_thread(progress.read)
        started, done_before = time.time(), progress.completed + progress.failed
        try:
            while not self._run_task.done():
                await asyncio.wait({self._run_task}, timeout=self.count_every_s)
                await asyncio.to_thread(progress.read)
                batch.request_counts = progress.counts(batch.request_counts.total)
                elapsed = time.time() - started
                rate = (progress.completed + progress.failed - done_before) / elapsed if elapsed > 0 else 0.0
                batch.x_kvbatch.update(run_folder=str(folder.path), requests_per_s=round(rate, 3),
                                       cache_share=progress.cache_share, failures=progress.failures,
                                       throughput=_with_point(batch.x_kvbatch.get("throughput", []),
                                                              progress.completed + progress.failed),
                                       **await asyncio.to_thread(_memory, folder, batch.x_kvbatch))
                await self._save(batch)
            outcome = self._run_task.result()
        except asyncio.CancelledError:
            if batch.id not in self._cancelled:  # the service is stopping: the batch goes on at the next start
                self._run_task.cancel()
                await asyncio.gather(self._run_task, return_exceptions=True)  # its journal closed, its servers down
                raise
            return None
        except KvbatchError as exc:
            return exc
        finally:
            self.running_id, self._run_task = None, None
        return outcome.stopped

    async def _finish(self, batch: BatchObject, *, cancelled: bool) -> None:
        folder = self.run_folder(batch.id)
        summary = Summary.read(folder.summary) if cancelled else None
        if summary is not None:  # a cancel that came after the last request: it completed
            cancelled = summary.completed_total + summary.failed_total < batch.request_counts.total
        now = int(time.time())
        if cancelled:
            batch.status, batch.cancelling_at = "cancelling", batch.cancelling_at or now
        else:
            batch.status, batch.finalizing_at = "finalizing", batch.finalizing_at or now
        await self._save(batch)
        await self._collect(batch)
        if self.report and folder.is_run() and folder.summary.exists():
            async with self._rendering:  # not beside a "report so far" of the same run
                batch.x_kvbatch["report"] = await asyncio.to_thread(self._render, folder)
        if cancelled:
            batch.status, batch.cancelled_at = "cancelled", int(time.time())
        else:
            batch.status, batch.completed_at = "completed", int(time.time())
        await self._ended(batch)

    async def report_now(self, batch_id: str) -> str | None:
        """Render the batch's run report from its run folder as it stands (the page's "report so far"); one render
        at a time. None when the run has not started."""
        folder = self.run_folder(batch_id)
        if not folder.is_run():
            return None
        async with self._rendering:
            return await asyncio.to_thread(self._render, folder)

    def _render(self, folder: RunFolder) -> str | None:
        from kvbatch.report.render import render_run_report

        try:
            return render_run_report(folder.path).name
        except KvbatchError as exc:
            log.warning("report of %s: %s", folder.path, exc)
            return None

    async def _output_file(self, batch: BatchObject, path: Path, kind: str) -> str | None:
        """A file record for the run's results.jsonl (or errors.jsonl): already in the OpenAI Batch output format."""
        existing = batch.output_file_id if kind == "output" else batch.error_file_id
        if existing or not path.exists() or path.stat().st_size == 0:
            return existing
        file_id = new_id("file")
        await asyncio.to_thread(self.store.add_file, file_id, f"{batch.id}_{kind}.jsonl", "batch_output",
                                path.stat().st_size, path)  # fmt: skip
        return file_id

    async def _ended(self, batch: BatchObject) -> None:
        await self._save(batch)
        self._cancelled.discard(batch.id)


def _with_point(points: list, done: int, now: float | None = None) -> list:
    """The throughput chart's [unix time, requests done] points with this moment's added; past
    API_THROUGHPUT_POINTS every other older point is dropped (the chart keeps the whole run, coarser)."""
    points = [*points, [round(time.time() if now is None else now, 1), done]]
    if len(points) > defaults.API_THROUGHPUT_POINTS:
        points = points[:-1:2] + points[-1:]
    return points


def _memory(folder: RunFolder, known: dict) -> dict:
    """The plan's memory and budget (plan.json, read once it is there), and the server's latest sample (memory.csv's
    last line)."""
    found: dict = {}
    if "planned_bytes" not in known and folder.plan.exists():
        plan = read_plan(folder.plan)
        found["planned_bytes"] = (plan.get("memory") or {}).get("total_bytes")
        found["budget_bytes"] = plan.get("budget_bytes")
    sample = last_memory_sample(folder.memory)
    if sample is not None:
        found["memory_bytes"] = sample.used_bytes
    return found
