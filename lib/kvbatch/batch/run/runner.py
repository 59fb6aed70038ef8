"""One batch run end to end: validate the input, take the run folder, plan (before anything is written), start or
reach the servers, execute, summarize. The CLI and `make batch` call `run_batch`."""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvbatch.aio import run_sync
from kvbatch.batch.inputs.answers import load_schema_file
from kvbatch.batch.inputs.endpoints import EndpointSpec, endpoint_specs
from kvbatch.batch.inputs.openai_batch import iter_openai_batch, load_index, save_index, scan_openai_batch
from kvbatch.batch.inputs.requests import InputReport
from kvbatch.batch.inputs.table import TableInput
from kvbatch.batch.plan.plan import Plan, least_slot_context
from kvbatch.batch.plan.plan_record import PlanRecord, plan_document
from kvbatch.batch.plan.prepare import Prepared, model_identity, prepare
from kvbatch.batch.plan.server_plans import EndpointPlan
from kvbatch.batch.run.execution.drain import restart_bound
from kvbatch.batch.run.execution.executor import Executor, RunOptions
from kvbatch.batch.run.execution.guard import TruncationGuard
from kvbatch.batch.run.execution.stats import RunStats
from kvbatch.batch.run.journal import Fingerprint, InputSource, Journal, JournalState
from kvbatch.batch.run.summary import EndpointSummary, Summary
from kvbatch.batch.runfolder import RunFolder, RunLock, write_json
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import KvbatchError, UserInputError
from kvbatch.serve.backends import backend_class, public_url
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.supervisor import EmbeddedSupervisor, ExternalSupervisor, OllamaSupervisor, Supervisor


@dataclass
class RunOutcome:
    folder: RunFolder
    plan: Plan | None
    stats: RunStats | None
    summary: Summary | None
    message: str
    stopped: KvbatchError | None = None
    """Why the run stopped before every request had an outcome (everything done is saved, summary.json too)."""


@dataclass(frozen=True)
class FieldRules:
    """What the servers of a run do with request body fields: refuse some (at validation, with the reason), and
    (Ollama) take only some, the others named in a note; never dropped silently."""

    refused: dict[str, str]
    accepted: frozenset[str] | None
    schema_keywords: dict[str, str] = field(default_factory=dict)
    """JSON Schema keywords a server refuses in a response_format schema, with the reason."""


def field_rules(specs: list[EndpointSpec]) -> FieldRules:
    refused: dict[str, str] = {}
    accepted: frozenset[str] | None = None
    keywords: dict[str, str] = {}
    for spec in specs:
        if spec.kind == "external":
            backend = backend_class(spec.backend)
            refused.update(backend.refused_fields)
            keywords.update(backend.refused_schema_keywords)
            if backend.accepted_fields is not None:
                accepted = backend.accepted_fields if accepted is None else accepted & backend.accepted_fields
    return FieldRules(refused, accepted, keywords)


def load_input(settings: BatchSettings, rules: FieldRules | None = None) -> tuple[InputReport, Any]:
    """Scan (validate and index) the input; return the report and a function giving the requests to run, with the
    generation overrides and a `max_tokens` for every request that sets none."""
    overrides = dict(settings.generation)

    def complete(body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, **overrides}
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = settings.default_max_tokens
        return body

    rules = rules or FieldRules({}, None)
    if settings.schema_path is not None and not settings.is_table:
        raise UserInputError("--schema is for a table input; an OpenAI Batch line gives its own response_format")
    if settings.is_table:
        if settings.template is None or settings.system_prompt_path is None:
            raise UserInputError("a table input needs both --system-prompt FILE and --template TEXT")
        body_defaults = {}
        if settings.schema_path is not None:
            body_defaults["response_format"] = load_schema_file(settings.schema_path, rules.schema_keywords)
        table = TableInput(settings.input_path, settings.system_prompt_path, settings.template, settings.id_column,
                           body_defaults=body_defaults)  # fmt: skip
        report = table.scan()

        def table_requests(done):
            for request in table.iter_requests(report, done):
                yield replace(request, body=complete(request.body))

        return report, table_requests
    report = load_index(settings.folder.index, settings.input_path)
    report = report or scan_openai_batch(settings.input_path, refused=rules.refused, accepted=rules.accepted,
                                         schema_keywords=rules.schema_keywords)  # fmt: skip

    def requests(done):
        for request in iter_openai_batch(report, done):
            yield replace(request, body=complete(request.body))

    return report, requests


def load_valid_input(settings: BatchSettings, say, rules: FieldRules | None = None):
    """load_input, then refuse an invalid input (every problem listed) and say the notes."""
    report, requests_fn = load_input(settings, rules)
    report.raise_if_invalid()
    for note in report.notes:
        say(f"note: {note}")
    return report, requests_fn


def run_specs(settings: BatchSettings) -> list[EndpointSpec]:
    """The servers `settings` names (the embedded default, --url, --endpoints, --servers, --ray)."""
    return endpoint_specs(urls=settings.urls, endpoints_file=settings.endpoints_file, backend=settings.backend,
                          model=settings.model, servers=settings.servers, ray=settings.ray)  # fmt: skip


def _describe(prepared: Prepared) -> str:
    if len(prepared.plans) == 1:
        return prepared.plan.describe()
    parts = []
    for index, endpoint in enumerate(prepared.plans):
        where = public_url(endpoint.spec.url) or (
            f"GPU {endpoint.spec.gpu}" if endpoint.spec.gpu is not None else "embedded"
        )
        parts.append(f"[endpoint {index}: {where}]\n{endpoint.plan.describe()}")
    return "\n".join(parts)


async def plan_only_async(settings: BatchSettings, *, say=print) -> Prepared:
    specs = run_specs(settings)
    report, requests_fn = load_valid_input(settings, say, field_rules(specs))
    if report.request_count == 0:
        raise UserInputError(f"nothing to plan: {settings.input_path} holds no requests")
    with tempfile.TemporaryDirectory() as scratch:
        prepared = await prepare(settings, report, requests_fn, specs, Path(scratch))
    for endpoint in prepared.plans:
        if endpoint.backend is not None:
            await endpoint.backend.aclose()
    return prepared


def plan_only(settings: BatchSettings, *, say=print) -> Prepared:
    """Validate the input and make the plan; run nothing."""
    return run_sync(plan_only_async(settings, say=say))


def _supervisors(settings: BatchSettings, prepared: Prepared, folder: RunFolder) -> list[Supervisor]:
    supervisors: list[Supervisor] = []
    embedded = [p for p in prepared.plans if p.spec.kind == "embedded"]
    for index, endpoint in enumerate(prepared.plans):
        plan = endpoint.plan
        smallest = least_slot_context(prepared.sizes, plan.layout.slot_context_tokens)
        if endpoint.spec.kind == "embedded":
            log = folder.server_log if len(embedded) == 1 else folder.path / f"server-{index}.log"
            assert endpoint.config is not None
            supervisors.append(
                EmbeddedSupervisor(
                    endpoint.config,
                    plan.layout,
                    min_slot_context=smallest,
                    log_path=log,
                    request_timeout_s=settings.request_timeout_s,
                )
            )
        elif endpoint.spec.kind == "ray":
            from kvbatch.batch.run.ray_pool import ray_supervisors

            supervisors.extend(ray_supervisors(endpoint, settings, prepared.sizes))
        elif endpoint.spec.backend == "ollama":
            assert endpoint.backend is not None
            on_gpu = bool(plan.budget and plan.budget.on_gpu)
            supervisors.append(OllamaSupervisor(endpoint.backend, plan.layout, min_slot_context=smallest,
                                                max_wait_s=settings.max_wait_s, gpu_budget=on_gpu,
                                                allow_cpu_spill=settings.allow_cpu_spill))  # fmt: skip
        else:
            assert endpoint.backend is not None
            supervisors.append(ExternalSupervisor(endpoint.backend, plan.layout, max_wait_s=settings.max_wait_s))
    return supervisors


def _restart_bounds(settings: BatchSettings, prepared: Prepared, supervisors: list[Supervisor]) -> list[int | None]:
    """Per supervisor, the memory past which its server is drained and restarted: our embedded servers only (their
    plans, in order), at --restart-above or the plan's peak and its allowance."""
    embedded = iter([p.plan for p in prepared.plans if p.spec.kind == "embedded"])
    bounds: list[int | None] = []
    for supervisor in supervisors:
        plan = next(embedded, None) if isinstance(supervisor, EmbeddedSupervisor) else None
        if plan is None or (plan.memory is None and not settings.restart_above_bytes):
            bounds.append(None)
        else:
            budget = plan.budget.bytes if plan.budget else None
            bounds.append(settings.restart_above_bytes or restart_bound(int(plan.memory.counted_bytes), budget))
    return bounds


def _fingerprint(settings: BatchSettings, report: InputReport, specs: list[EndpointSpec]) -> Fingerprint:
    return Fingerprint(
        input_hash=report.input_hash,
        model=model_identity(settings, specs[0]),
        system_prompt_hash=report.system_prompt_hash(),
        generation={"overrides": settings.generation, "default_max_tokens": settings.default_max_tokens},
        mode=settings.mode,
    )


def _remaining(settings: BatchSettings, report: InputReport, fingerprint: Fingerprint) -> tuple[int, JournalState]:
    """How many requests are still to do, and the journal's state read for it (each result file once: the journal
    opens from it); refuses a different run (its fingerprint) before any planning."""
    state = Journal.state(settings.folder, fingerprint)
    done = len(state.done) - (len(state.failed) if settings.retry_failed else 0)
    return report.request_count - done, state


async def run_batch_async(settings: BatchSettings, *, say=print) -> RunOutcome:
    """The whole run. What reads files before the first request (the input's validation, the journal, the model's
    checksum) runs on a thread: nothing holds the event loop (asyncio's debug mode finds no callback over 100 ms)."""
    specs = run_specs(settings)
    report, requests_fn = await asyncio.to_thread(load_valid_input, settings, say, field_rules(specs))
    folder = settings.folder
    if report.request_count == 0:
        return RunOutcome(folder, None, None, None, f"nothing to do: {settings.input_path} holds no requests")
    with RunLock(folder):
        fingerprint = await asyncio.to_thread(_fingerprint, settings, report, specs)
        remaining, state = await asyncio.to_thread(_remaining, settings, report, fingerprint)
        if remaining <= 0:
            summary = Summary.read(folder.summary)
            return RunOutcome(folder, None, None, summary, f"all {report.request_count} requests are already done")
        with tempfile.TemporaryDirectory() as scratch:
            prepared = await prepare(settings, report, requests_fn, specs, Path(scratch))
        say(_describe(prepared))
        # run.json is written only now: a plan error leaves no run behind
        source = InputSource(path=str(settings.input_path.resolve()), table=settings.is_table,
                             id_column=settings.id_column)  # fmt: skip
        journal = await asyncio.to_thread(functools.partial(Journal.open, folder, fingerprint, source, state=state))
        if journal.resumed:
            say(
                f"resuming {folder.path}: {len(journal.done)} of {report.request_count} already done"
                + (f" (cut a torn last line of {journal.repaired_bytes} bytes)" if journal.repaired_bytes else "")
            )
        if settings.retry_failed:
            retried = await asyncio.to_thread(journal.retry_failed)
            say(f"sending again {retried} request(s) from errors.jsonl (kept in errors-history.jsonl)")
        if not settings.is_table and await asyncio.to_thread(load_index, folder.index, settings.input_path) is None:
            await asyncio.to_thread(save_index, report, folder.index)
        supervisors = _supervisors(settings, prepared, folder)
        planned = _write_plan(folder, prepared, supervisors)
        return await _execute(settings, report, requests_fn, prepared, supervisors, journal,
                              report.request_count - len(journal.done), planned)  # fmt: skip


def _write_plan(folder: RunFolder, prepared: Prepared, supervisors: list[Supervisor],
                planned: list[PlanRecord] | None = None) -> list[PlanRecord]:  # fmt: skip
    """plan.json: what was planned (`planned`, when given: the records made before the servers started) and, under
    `server`, each server's settings as they are (a start-up back-off's smaller layout shows there)."""
    records = planned or [endpoint.plan.record() for endpoint in prepared.plans]
    for record, supervisor in zip(records, supervisors, strict=False):
        record.server = supervisor.flags()
    write_json(folder.plan, plan_document(records))
    return records


async def _execute(settings: BatchSettings, report: InputReport, requests_fn, prepared: Prepared,
                   supervisors: list[Supervisor], journal: Journal, remaining: int,
                   planned: list[PlanRecord]) -> RunOutcome:  # fmt: skip
    plan = prepared.plan
    calibration = prepared.calibration
    options = RunOptions(
        mode=settings.mode,
        concurrency=settings.concurrency,
        chunk_size=lambda: plan.chunk_size_at(_running_slot_context(supervisors, plan.layout)),  # read live
        max_attempts=settings.max_attempts,
        answer_attempts=settings.answer_attempts,
        max_wait_s=settings.max_wait_s,
        memory_threshold_bytes=settings.memory_threshold_bytes,
        restart_bounds=_restart_bounds(settings, prepared, supervisors),
        memory_interval_s=settings.memory_sample_s,
        progress=settings.progress,
        estimated_seconds=plan.estimated_seconds,
    )
    guard = TruncationGuard(calibration.prefix_tokens, calibration.chars_per_token, exact=calibration.exact)
    executor = Executor(journal, supervisors, options, folder=settings.folder, total=remaining, guard=guard,
                        prefix_tokens=calibration.prefix_tokens)  # fmt: skip
    started = time.time()
    stopped: KvbatchError | None = None
    try:
        for supervisor in supervisors:
            for backoff in await supervisor.start():
                settings.folder.append_event("start_backoff", endpoint=supervisor.label,
                                             **backoff.event_fields(supervisor.layout))  # fmt: skip
        _write_plan(settings.folder, prepared, supervisors, planned)  # the servers as started (a Ray actor's own plan)
        await executor.run(requests_fn(journal.done))  # the journal's own set: no 20 MB copy
    except KvbatchError as exc:  # stopped: what was done is summarized below all the same
        stopped = exc
        settings.folder.append_event("stopped", error=type(exc).__name__, message=str(exc)[:500])
    finally:
        await asyncio.gather(*(s.close() for s in supervisors), return_exceptions=True)
        journal.close()
        if settings.ray == "local":
            import ray

            ray.shutdown()
        # after any stop (--max-wait, Ctrl-C, a fatal error) too: summary.json is never stale
        summary = _summary(report, prepared, executor.stats, executor, started, journal, remaining)
        write_json(settings.folder.summary, summary.model_dump())
    message = (
        f"{summary.completed_total} of {report.request_count} requests done, {summary.failed_total} failed for "
        f"good; results: {settings.folder.results}"
    )
    return RunOutcome(settings.folder, plan, executor.stats, summary, message, stopped)


def _summary(report: InputReport, prepared: Prepared, stats: RunStats, executor: Executor, started: float,
             journal: Journal, remaining: int) -> Summary:  # fmt: skip
    elapsed = time.time() - started
    plan = prepared.plan
    endpoints = []
    for endpoint in executor.endpoints:
        numbers = stats.endpoint(endpoint.label)
        endpoints.append(EndpointSummary(
            label=endpoint.label, server=endpoint.supervisor.flags(), completed=numbers.completed,
            failed=numbers.failed, retries=numbers.retried, recoveries=numbers.recoveries,
            requests_per_s=round(numbers.completed / elapsed, 4) if elapsed else None,
            cache_share_of_prompt_tokens=numbers.cache_share(), out_of_pool_s=round(numbers.out_s, 1),
        ))  # fmt: skip
    monitors = [e.monitor for e in executor.endpoints if e.monitor is not None]
    estimate = plan.estimated_seconds * remaining / plan.request_count if plan.estimated_seconds else None
    return Summary(
        requests_in_input=report.request_count,
        completed_this_invocation=stats.completed,
        failed_this_invocation=stats.failed,
        completed_total=len(journal.done - journal.failed),  # the journal's own sets: no re-read of the files
        failed_total=len(journal.failed),
        retries=stats.retried,
        waited_s=round(stats.waited_s, 2),
        elapsed_s=round(elapsed, 3),
        requests_per_s=round(stats.finished / elapsed, 4) if elapsed else None,
        estimated_s=round(estimate, 1) if estimate else None,
        re_estimated_s=round(executor.re_estimate_s, 1) if executor.re_estimate_s else None,
        prompt_tokens=stats.prompt_tokens,
        cached_prompt_tokens=stats.cached_tokens,
        completion_tokens=stats.completion_tokens,
        answers_cut_at_max_tokens=stats.truncated_answers,
        answers_checked=stats.answers_checked,
        answers_valid_at_first_attempt=stats.answers_valid_first,
        invalid_answers=dict(stats.invalid_answers),
        cache_share_of_prompt_tokens=stats.cache_share(),
        system_prompt_share_served_from_cache=stats.system_prompt_share(),
        per_prefix={key: value.__dict__ for key, value in stats.per_prefix.items()},
        per_endpoint=endpoints,
        concurrency_trials=stats.trials,
        memory_peak_bytes=max((m.peak_bytes for m in monitors), default=None) or None,
        memory_probe=next((m.probe_name for m in monitors if m.probe_name), None),
        mode=plan.mode,
        parallel_slots=sum(e.slots for e in executor.endpoints),
        slot_context_tokens=_running_slot_context([e.supervisor for e in executor.endpoints], plan.layout),
    )


def _running_slot_context(supervisors: list[Supervisor], planned: SlotLayout) -> int:
    """The per-slot context the servers run with now (after any back-off: each supervisor holds its own layout),
    the smallest of them; the plan's before any server has said."""
    return min((s.layout.slot_context_tokens for s in supervisors if s.layout.slot_context_tokens),
               default=planned.slot_context_tokens)  # fmt: skip


def run_batch(settings: BatchSettings, *, say=print) -> RunOutcome:
    return run_sync(run_batch_async(settings, say=say))


__all__ = ["EndpointPlan", "RunOutcome", "load_input", "plan_only", "run_batch"]
