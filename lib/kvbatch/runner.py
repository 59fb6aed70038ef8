"""One batch run end to end: validate the input, open (or resume) the run folder, learn the token sizes, plan,
start or reach the server, execute, summarize. The CLI and `make batch` call `run_batch`."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from kvbatch.aio import run_sync
from kvbatch.backends import get_backend
from kvbatch.batchio import InputReport, TableInput, iter_openai_batch, load_index, save_index, scan_openai_batch
from kvbatch.errors import UserInputError
from kvbatch.executor import Executor, RunOptions, RunStats
from kvbatch.journal import Fingerprint, Journal
from kvbatch.kvmodel import architecture_from_gguf, kv_bytes_per_token
from kvbatch.plan import Limits, Plan, make_plan, result_path, size_profile
from kvbatch.probes import ProcessRssProbe
from kvbatch.server import EmbeddedServer, ServerConfig, default_model_path
from kvbatch.supervisor import EmbeddedSupervisor, ExternalSupervisor, Supervisor
from kvbatch.tokens import count_tokens

RUNS_DIR = Path("data/runs")
CALIBRATION_SAMPLE = 20
INDEX_FILE = "input-index.json"


@dataclass
class BatchSettings:
    """Everything one invocation of `kvbatch run` decides. Generation settings enter the run fingerprint."""

    input_path: Path
    run_dir: Path
    system_prompt_path: Path | None = None
    template: str | None = None
    id_column: str | None = None
    mode: str = "independent"
    concurrency: int | str = "auto"
    max_slots: int | None = None
    slot_context_tokens: int | None = None
    url: str | None = None
    backend: str = "openai"
    model: str | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    memory_budget_bytes: int | None = None
    safety_margin: float = 0.8
    measurement_path: Path | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    default_max_tokens: int = 512
    max_attempts: int = 4
    progress: bool = True
    memory_threshold_bytes: int | None = None


@dataclass
class RunOutcome:
    run_dir: Path
    plan: Plan | None
    stats: RunStats | None
    summary: dict[str, Any]
    message: str


def load_input(settings: BatchSettings) -> tuple[InputReport, Any]:
    """Scan (validate and index) the input; return the report and a function giving the requests to run."""
    if settings.template is not None or settings.system_prompt_path is not None:
        if settings.template is None or settings.system_prompt_path is None:
            raise UserInputError("a table input needs both --system-prompt FILE and --template TEXT")
        table = TableInput(
            settings.input_path,
            settings.system_prompt_path,
            settings.template,
            settings.id_column,
            body_defaults=dict(settings.generation),
        )
        report = table.scan()
        return report, lambda done: table.iter_requests(report, done)
    report = load_index(settings.run_dir / INDEX_FILE, settings.input_path) if settings.input_path.is_file() else None
    report = report or scan_openai_batch(settings.input_path)
    generation = settings.generation

    def requests(done):
        for request in iter_openai_batch(report, done):
            if generation:
                request = replace(request, body={**request.body, **generation})
            yield request

    return report, requests


def model_id(settings: BatchSettings) -> str:
    if settings.url:
        return settings.model or "server-default"
    return Path(settings.server.model_path).name if settings.server.model_path else "gemma3-270m-q4_k_m.gguf"


async def _calibrate(backend, report: InputReport, requests_fn) -> tuple[dict[str, int], float, str]:
    """Exact system-prompt tokens per prefix, and a chars-per-token ratio from a sample of user messages."""
    prefix_keys = list(report.prefix_texts)[:50]
    prefix_counts = await count_tokens(backend, [report.prefix_texts[k] for k in prefix_keys])
    sample = [r.body["messages"][-1]["content"] for r in itertools.islice(requests_fn(frozenset()), CALIBRATION_SAMPLE)]
    sample = [s if isinstance(s, str) else "" for s in sample]
    user_counts = await count_tokens(backend, sample)
    prefix_tokens = dict(zip(prefix_keys, prefix_counts.counts, strict=False))
    return prefix_tokens, user_counts.chars_per_token(sample), user_counts.source


def _fallback_limits(settings: BatchSettings, model_path: Path | None, base_bytes: float) -> Limits:
    """No measurement file: the architecture's slope, a budget, and the base memory from a quick probe."""
    config = settings.server
    trained = None
    if settings.url:
        # Another machine's memory is not ours to read: the server enforces its own limits and answers
        # over-long requests with an error; in-flight requests come from --parallel (and `auto`).
        return Limits(
            safe_context_tokens=10**9,
            kv_bytes_per_token=0.0,
            base_bytes=0.0,
            budget_bytes=None,
            trained_context_tokens=None,
            source="external server: limits are the server's own",
        )
    slope = 18 * 1024.0
    source = "assumed 18 KiB/token"
    if model_path is not None:
        arch = architecture_from_gguf(model_path)
        slope = kv_bytes_per_token(
            arch, cache_type_k=config.cache_type_k, cache_type_v=config.cache_type_v, swa_full=config.swa_full
        )
        trained = arch.context_length_trained
        source = f"predicted {slope / 1024:.1f} KiB/token from the GGUF"
    budget = settings.memory_budget_bytes or config.memory_cap_bytes or psutil.virtual_memory().available
    usable = budget * settings.safety_margin - base_bytes
    safe = int(max(usable, 0) / slope) if slope else 0
    return Limits(
        safe_context_tokens=safe,
        kv_bytes_per_token=slope,
        base_bytes=base_bytes,
        budget_bytes=budget,
        trained_context_tokens=trained,
        source=f"{source}, budget {budget / 2**30:.2f} GiB x {settings.safety_margin:.0%}",
    )


async def _learn_sizes_embedded(settings: BatchSettings, report: InputReport, requests_fn, run_dir: Path):
    """A short-lived server at a small context: the real tokenizer, and the memory the model needs before any KV."""
    config = replace(settings.server, context_tokens=1024, parallel_slots=1, memory_cap_bytes=None)
    with EmbeddedServer(config, log_path=run_dir / "probe-server.log") as server:
        backend = get_backend("openai", server.url)
        try:
            calibration = await _calibrate(backend, report, requests_fn)
        finally:
            await backend.aclose()
        base_bytes = ProcessRssProbe(server.pid).read() - server.log().kv_total_bytes
    return calibration, base_bytes


def _write_json(path: Path, data: Any) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(data, indent=2, default=str), "utf-8")
    temp.replace(path)


@dataclass
class Prepared:
    plan: Plan
    sizes: Any
    limits: Limits
    prefix_tokens: dict[str, int]
    backend: Any


async def _prepare(settings: BatchSettings, report: InputReport, requests_fn, run_dir: Path, say) -> Prepared:
    """Learn the real token sizes, find the limits (measured, or predicted plus a quick probe) and make the plan."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path: Path | None = None
    backend = None
    if settings.url:
        backend = get_backend(settings.backend, settings.url, model=settings.model)
        calibration = await _calibrate(backend, report, requests_fn)
        base_bytes = 0.0
    else:
        model_path = Path(settings.server.model_path) if settings.server.model_path else default_model_path()
        settings.server = replace(settings.server, model_path=model_path)
        calibration, base_bytes = await _learn_sizes_embedded(settings, report, requests_fn, run_dir)
    prefix_tokens, chars_per_token, token_source = calibration
    system_tokens = max(prefix_tokens.values(), default=0)
    sizes = size_profile(report, system_tokens, chars_per_token, token_source, settings.default_max_tokens)
    measured = settings.measurement_path or result_path(model_id(settings), settings.server)
    limits = (Limits.from_measurement_file(measured) if measured.exists() else None) or _fallback_limits(
        settings, model_path, base_bytes
    )
    seconds_per_prompt, seconds_per_answer = _speeds(measured)
    plan = make_plan(
        sizes,
        limits,
        mode=settings.mode,
        max_slots=settings.max_slots or 16,
        requested_slots=settings.max_slots if settings.concurrency != "auto" else None,
        requested_context=settings.slot_context_tokens,
        seconds_per_prompt_token=seconds_per_prompt,
        seconds_per_answer_token=seconds_per_answer,
    )
    say(plan.describe())
    return Prepared(plan, sizes, limits, prefix_tokens, backend)


def load_valid_input(settings: BatchSettings, say) -> tuple[InputReport, Any]:
    """load_input, then refuse an invalid input (every problem listed) and say the notes."""
    report, requests_fn = load_input(settings)
    report.raise_if_invalid()
    for note in report.notes:
        say(f"note: {note}")
    return report, requests_fn


async def plan_only_async(settings: BatchSettings, *, say=print) -> Plan:
    import tempfile

    report, requests_fn = load_valid_input(settings, say)
    if report.request_count == 0:
        raise UserInputError(f"nothing to plan: {settings.input_path} holds no requests")
    with tempfile.TemporaryDirectory() as scratch:
        prepared = await _prepare(settings, report, requests_fn, Path(scratch), say)
    if prepared.backend is not None:
        await prepared.backend.aclose()
    return prepared.plan


def plan_only(settings: BatchSettings) -> str:
    """Validate the input and make the plan (printed as it is made); run nothing."""
    plan = run_sync(plan_only_async(settings))
    return f"planned {plan.request_count} requests; nothing was run"


async def run_batch_async(settings: BatchSettings, *, say=print) -> RunOutcome:
    report, requests_fn = load_valid_input(settings, say)
    if report.request_count == 0:
        return RunOutcome(settings.run_dir, None, None, {}, f"nothing to do: {settings.input_path} holds no requests")
    system_hash = hashlib.sha256("".join(sorted(report.prefix_texts)).encode()).hexdigest()
    fingerprint = Fingerprint(
        report.input_hash,
        model_id(settings),
        f"sha256:{system_hash}",
        {"overrides": settings.generation, "default_max_tokens": settings.default_max_tokens},
        settings.mode,
    )
    run_dir = settings.run_dir
    journal = Journal.open(run_dir, fingerprint)
    if not settings.template and load_index(run_dir / INDEX_FILE, settings.input_path) is None:
        save_index(report, run_dir / INDEX_FILE)
    remaining = report.request_count - len(journal.done)
    if journal.resumed:
        say(
            f"resuming {run_dir}: {len(journal.done)} of {report.request_count} already done"
            + (f" (cut a torn last line of {journal.repaired_bytes} bytes)" if journal.repaired_bytes else "")
        )
    if remaining <= 0:
        journal.close()
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        return RunOutcome(run_dir, None, None, summary, f"all {report.request_count} requests are already done")

    prepared = await _prepare(settings, report, requests_fn, run_dir, say)
    plan, sizes, prefix_tokens, backend = prepared.plan, prepared.sizes, prepared.prefix_tokens, prepared.backend
    _write_json(
        run_dir / "plan.json",
        {
            "plan": plan.as_dict(),
            "sizes": asdict(sizes),
            "limits": asdict(prepared.limits),
            "server": settings.server.flags() if not settings.url else {"url": settings.url},
        },
    )

    supervisor: Supervisor
    if settings.url:
        supervisor = ExternalSupervisor(
            backend,
            slots=plan.parallel_slots,
            slot_pinning=settings.backend == "openai" and await _is_llama_server(backend),
        )
    else:
        server_config = replace(settings.server, parallel_slots=plan.parallel_slots)
        supervisor = EmbeddedSupervisor(
            server_config,
            slot_context=plan.slot_context_tokens,
            min_slot_context=min(sizes.longest_request_tokens, plan.slot_context_tokens),
            log_path=run_dir / "server.log",
        )
    options = RunOptions(
        mode=settings.mode,
        concurrency=settings.concurrency,
        chunk_size=plan.chunk_size,
        slot_context_tokens=plan.slot_context_tokens,
        max_attempts=settings.max_attempts,
        memory_threshold_bytes=settings.memory_threshold_bytes,
        progress=settings.progress,
        concurrency_candidates=tuple(c for c in (1, 2, 4, 8, 16, 32) if c <= plan.parallel_slots),
    )
    executor = Executor(journal, supervisor, options, run_dir=run_dir, prefix_tokens=prefix_tokens, total=remaining)
    started = time.time()
    try:
        backoffs = await supervisor.start()
        for backoff in backoffs:
            executor.event("start_backoff", **asdict(backoff))
        stats = await executor.run(requests_fn(frozenset(journal.done)))
    finally:
        await supervisor.close()
        journal.close()
    summary = _summary(report, plan, stats, executor, started, journal)
    _write_json(run_dir / "summary.json", summary)
    message = (
        f"{summary['completed_total']} of {report.request_count} requests done, {summary['failed_total']} "
        f"failed for good; results: {run_dir / 'results.jsonl'}"
    )
    return RunOutcome(run_dir, plan, stats, summary, message)


async def _is_llama_server(backend) -> bool:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(backend.base_url + "/props", timeout=aiohttp.ClientTimeout(total=5)) as reply,
        ):
            return reply.status == 200 and "default_generation_settings" in await reply.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return False


def _speeds(measured: Path) -> tuple[float | None, float | None]:
    if not measured.exists():
        return None, None
    speeds = json.loads(measured.read_text()).get("speeds") or {}
    prompt, answer = speeds.get("prompt_tokens_per_s"), speeds.get("answer_tokens_per_s")
    return (1 / prompt if prompt else None), (1 / answer if answer else None)


def _summary(
    report: InputReport, plan: Plan, stats: RunStats, executor: Executor, started: float, journal: Journal
) -> dict[str, Any]:
    from kvbatch.journal import completed_ids

    elapsed = time.time() - started
    ok_total = len(completed_ids(journal.results_path))
    failed_total = len(completed_ids(journal.errors_path))
    per_prefix = {key: asdict(value) for key, value in stats.per_prefix.items()}
    system_served = stats.system_prompt_share()
    return {
        "requests_in_input": report.request_count,
        "completed_this_invocation": stats.completed,
        "failed_this_invocation": stats.failed,
        "completed_total": ok_total,
        "failed_total": failed_total,
        "retries": stats.retried,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round((stats.completed + stats.failed) / elapsed, 4) if elapsed else None,
        "prompt_tokens": stats.prompt_tokens,
        "cached_prompt_tokens": stats.cached_tokens,
        "completion_tokens": stats.completion_tokens,
        "cache_share_of_prompt_tokens": stats.cache_share(),
        "system_prompt_share_served_from_cache": system_served,
        "per_prefix": per_prefix,
        "concurrency_trials": stats.trials,
        "memory_peak_bytes": executor.monitor.peak_bytes if executor.monitor else None,
        "memory_probe": executor.monitor.probe_name if executor.monitor else None,
        "mode": plan.mode,
        "parallel_slots": executor.supervisor.slots,
    }


def run_batch(settings: BatchSettings, *, say=print) -> RunOutcome:
    return run_sync(run_batch_async(settings, say=say))
