"""Before the first request: learn the real token sizes, find each server's limits (measured, discovered, or
predicted from the architecture plus a quick probe of the base memory), and make each server's plan."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

from kvbatch import defaults
from kvbatch.batch.endpoints import EndpointSpec
from kvbatch.batch.memory import MemoryModel
from kvbatch.batch.plan import Plan, PlanInputs, make_plan
from kvbatch.batch.requests import InputReport
from kvbatch.batch.settings import BatchSettings
from kvbatch.batch.sizes import SizeProfile, size_profile
from kvbatch.batch.tokens import Calibration, calibrate
from kvbatch.errors import ServerStartError, UserInputError
from kvbatch.measure.budget import Budget, default_budget, gpu_budget, ram_budget, resolve_budget
from kvbatch.measure.kvmodel import KvArchitecture, KvCacheTypes, architecture_from_gguf, architecture_from_metadata
from kvbatch.measure.kvmodel import kv_cache as kv_cache_of
from kvbatch.measure.result import Measurement, find_measurement, load_measurement, measurement_path
from kvbatch.serve.backends import Backend, ServerLimits, get_backend
from kvbatch.serve.backends.base import is_local
from kvbatch.serve.backends.ollama_native import server_settings
from kvbatch.serve.config import ServerConfig, build_has_gpu
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.probes import nvml_available, probe_for_server
from kvbatch.serve.server import EmbeddedServer, default_model_path
from kvbatch.units import format_bytes

PROBE_CONTEXT = 1024


@dataclass
class EndpointPlan:
    spec: EndpointSpec
    plan: Plan
    config: ServerConfig | None = None
    """The embedded server's settings (cache types from the plan); None for a running server."""
    backend: Backend | None = None
    """A running server's backend, built while planning and used by the run."""


@dataclass
class Prepared:
    plans: list[EndpointPlan]
    sizes: SizeProfile
    calibration: Calibration

    @property
    def plan(self) -> Plan:
        return self.plans[0].plan


def kv_candidates(kv_type: str) -> tuple[KvCacheTypes, ...]:
    if kv_type == "auto":
        return tuple(KvCacheTypes(kind, kind) for kind in defaults.KV_TYPES_AUTO)
    return (KvCacheTypes(kv_type, kv_type),)


def model_identity(settings: BatchSettings, spec: EndpointSpec) -> str:
    """Backend, model and KV cache types, for the run's fingerprint (not the address: a server may move). It is
    made from the command line alone, so a resume while a server is down is not refused for that."""
    if spec.kind == "external":
        return f"{spec.backend}:{spec.model or 'server-default'}:{settings.kv_type}"
    model = model_file(settings).name
    return f"{spec.kind}:{model}:{settings.kv_type}{'-swafull' if settings.server.swa_full else ''}"


def _load_measurement(path: Path) -> tuple[Measurement | None, str | None, str | None]:
    """The measurement at `path` if it holds a fit, with the file name and why it was (not) used."""
    if not path.exists():
        return None, None, f"none at {path}: planned from the architecture and a quick probe of the base memory"
    measurement = load_measurement(path)
    if not measurement.kv_bytes_per_token or measurement.base_bytes is None:
        return None, str(path), "it holds no fit yet (run the kv_growth notebook): planned from the architecture"
    return measurement, str(path), None


def _inputs(settings: BatchSettings, memory: MemoryModel | None, budget: Budget | None,
            measurement: Measurement | None, path: str | None, reason: str | None, **extra) -> PlanInputs:  # fmt: skip
    speeds = {}
    if measurement is not None:
        sustained = measurement.sustained
        if sustained and sustained.passed and sustained.requests_per_s:
            speeds["sustained_rate"] = (sustained.slots, sustained.slot_context_tokens, sustained.requests_per_s)
        if measurement.prompt_tokens_per_s and measurement.answer_tokens_per_s:
            speeds["seconds_per_prompt_token"] = 1 / measurement.prompt_tokens_per_s
            speeds["seconds_per_answer_token"] = 1 / measurement.answer_tokens_per_s
    measured_budget = None
    if measurement and measurement.budget and budget and measurement.budget_bytes != budget.bytes:
        measured_budget = measurement.budget
    extra.setdefault("trained_context_tokens", memory.arch.context_length_trained if memory else None)
    return PlanInputs(
        memory=memory, budget=budget, margin=settings.safety_margin, measurement_file=path,
        measurement_reason=reason, measured_budget=measured_budget, **speeds, **extra,
    )  # fmt: skip


def _plan(settings: BatchSettings, sizes: SizeProfile, inputs: PlanInputs) -> Plan:
    return make_plan(
        sizes,
        inputs,
        mode=settings.mode,
        max_slots=settings.slots or defaults.MAX_SLOTS,
        requested_slots=settings.slots if settings.concurrency != "auto" or settings.slots else None,
        requested_context=settings.slot_context_tokens,
    )


def _shared(budget: Budget, share: int) -> Budget:
    if share <= 1:
        return budget
    value = budget.bytes // share
    return dataclasses.replace(budget, bytes=value, text=f"{budget.text} / {share} servers")


async def _embedded_plan(settings: BatchSettings, sizes: SizeProfile, spec: EndpointSpec, base_bytes: float,
                         share: int) -> EndpointPlan:  # fmt: skip
    model_path = await asyncio.to_thread(model_file, settings)
    arch = await asyncio.to_thread(architecture_from_gguf, model_path)
    candidates = kv_candidates(settings.kv_type)
    on_gpu = build_has_gpu() and settings.server.gpu_layers != 0
    types = replace(candidates[0], swa_full=settings.server.swa_full)
    path = settings.measurement_path or find_measurement("embedded", model_path.name, types)
    measurement, shown, reason = _load_measurement(path)
    if settings.memory_budget:
        budget = resolve_budget(settings.memory_budget, on_gpu=on_gpu)
        budget = budget if spec.gpu is not None else _shared(budget, share)  # servers on one memory share it
    elif settings.server.memory_cap_bytes:
        cap = settings.server.memory_cap_bytes
        budget = Budget(cap, f"{format_bytes(cap)} (--memory-cap, of address space)", "user")
    elif spec.gpu is not None:
        budget = gpu_budget(spec.gpu) or ram_budget()
    else:
        budget = _shared(default_budget(on_gpu), share)
    options = {"checkpoints_in_budget": not on_gpu, "ctx_checkpoints": settings.server.ctx_checkpoints or 0}
    if measurement is not None:
        memory = MemoryModel.from_measurement(arch, measurement, types, **options)
    else:
        memory = MemoryModel(arch, base_bytes, types, source="predicted from the GGUF, base from a quick probe",
                             **options)  # fmt: skip
    inputs = _inputs(settings, memory, budget, measurement, shown, reason,
                     kv_types=tuple(replace(t, swa_full=settings.server.swa_full) for t in candidates),
                     limits_source=memory.source)  # fmt: skip
    plan = _plan(settings, sizes, inputs)
    config = replace(settings.server, model_path=model_path, cache_type_k=plan.kv_types.k,
                     cache_type_v=plan.kv_types.v, gpu_index=spec.gpu)  # fmt: skip
    return EndpointPlan(spec, plan, config=config)


async def _ollama_base(backend, arch: KvArchitecture, types: KvCacheTypes, parallel: int) -> float:
    """What the model holds beside its KV cache, from /api/ps (loading it at a small context if needed)."""
    loaded = await backend.loaded()
    if loaded is None or not loaded.context_length:
        await backend.fill(1, context_tokens=2048, max_tokens=1)
        loaded = await backend.loaded()
    if loaded is None or not loaded.context_length:
        raise UserInputError(f"Ollama does not list {backend.model} in /api/ps after a request; is it the right URL?")
    cache = kv_cache_of(arch, SlotLayout(parallel, loaded.context_length), types)
    return max(loaded.size_bytes - cache.cache_bytes, 0.0)


async def _ollama_plan(settings: BatchSettings, sizes: SizeProfile, spec: EndpointSpec) -> EndpointPlan:
    if not spec.model:
        raise UserInputError("--backend ollama needs --model (the Ollama model name, e.g. gemma3:12b)")
    backend = get_backend("ollama", spec.url, model=spec.model, api_key=spec.api_key(),
                          request_timeout_s=settings.request_timeout_s)  # fmt: skip
    kind, parallel = server_settings(
        spec.url, None if settings.kv_type in ("auto", "f16") else settings.kv_type, settings.parallel
    )
    types = KvCacheTypes(kind, kind)
    arch = architecture_from_metadata(await backend.model_info(), source=f"{backend.base_url} /api/show {spec.model}")
    path = settings.measurement_path or measurement_path("ollama", spec.model, types)
    measurement, shown, reason = _load_measurement(path)
    on_gpu = is_local(spec.url) and nvml_available()
    if measurement is not None:
        memory = MemoryModel.from_measurement(arch, measurement, types, checkpoints_in_budget=False, ctx_checkpoints=0)
    else:
        base = await _ollama_base(backend, arch, types, parallel)
        memory = MemoryModel(arch, base, types, checkpoints_in_budget=False, ctx_checkpoints=0,
                             source="predicted from /api/show, base from /api/ps")  # fmt: skip
    if settings.memory_budget:
        budget = resolve_budget(settings.memory_budget, on_gpu=on_gpu)
    elif on_gpu:
        budget = gpu_budget()
        loaded = await backend.loaded()
        if budget and loaded:  # the model's own memory is ours to re-plan, not another process's
            budget = dataclasses.replace(budget, bytes=budget.bytes + loaded.vram_bytes,
                                         text=f"{budget.text} (+ {spec.model} itself)")  # fmt: skip
    elif measurement is not None and measurement.budget_bytes and not measurement.budget_is_demo:
        budget = Budget(measurement.budget_bytes, f"{measurement.budget} (from the measurement)", "user")
    elif is_local(spec.url):
        budget = ram_budget()
    else:
        budget = None
    inputs = _inputs(
        settings,
        memory if budget else None,
        budget,
        measurement,
        shown,
        reason,
        kv_types=(types,),
        kv_type_is_ours=False,
        fixed_slots=parallel,
        trained_context_tokens=arch.context_length_trained,
        limits_source=f"{memory.source}; OLLAMA_NUM_PARALLEL={parallel}, cache {types.label}",
    )
    if budget is None:
        inputs.server_limits = ServerLimits(slots=parallel, slot_context_tokens=None, server_kind="ollama",
                                            sources={"slots": "--parallel"})  # fmt: skip
    plan = _plan(settings, sizes, inputs)
    if budget is None:
        plan.notes.append("the server's memory is not ours to read: give --memory-budget (its card's) to plan it")
    backend.layout = plan.layout
    return EndpointPlan(spec, plan, backend=backend)


async def _openai_plan(settings: BatchSettings, sizes: SizeProfile, spec: EndpointSpec) -> EndpointPlan:
    backend = get_backend("openai", spec.url, model=spec.model, api_key=spec.api_key(),
                          request_timeout_s=settings.request_timeout_s)  # fmt: skip
    limits = await backend.limits()
    if spec.slots:
        limits.slots = spec.slots
        limits.sources["slots"] = "endpoints file"
    if not limits.slots:
        limits.slots = settings.slots or defaults.UNKNOWN_SERVER_SLOTS
        limits.sources["slots"] = "--slots" if settings.slots else "not reported: the run measures how many in flight"
    if not limits.slot_context_tokens:
        wanted = settings.slot_context_tokens or sizes.longest_request_tokens
        limits.slot_context_tokens = wanted
        limits.sources["slot_context_tokens"] = "assumed (the largest request)"
    backend.slot_pinning = limits.slot_pinning
    inputs = PlanInputs(
        server_limits=limits,
        limits_source=limits.describe(),
        measurement_reason="a running OpenAI-compatible server: its limits are discovered",
    )
    plan = _plan(settings, sizes, inputs)
    return EndpointPlan(spec, plan, backend=backend)


def _probe_server(settings: BatchSettings, model_path: Path, log_dir: Path) -> EmbeddedServer:
    """A short-lived server at a small context, one slot, no warm-up: for the tokenizer and the base memory."""
    config = replace(settings.server, model_path=model_path, context_tokens=PROBE_CONTEXT, parallel_slots=1,
                     memory_cap_bytes=None, extra_args=[*settings.server.extra_args, "--no-warmup"])  # fmt: skip
    return EmbeddedServer(config, log_path=log_dir / "probe-server.log")


def _base_bytes(server: EmbeddedServer) -> float:
    """What the model holds before any KV cache: the server's memory less its logged KV buffers."""
    return float(probe_for_server(server.pid, server.log_text).read() - server.log().kv_total_bytes)


async def _sizes_from_embedded(settings: BatchSettings, report: InputReport, requests_fn, model_path: Path,
                               log_dir: Path) -> tuple[Calibration, float]:  # fmt: skip
    """The real tokenizer, and the memory the model needs before any KV, from one probe server."""
    async with _probe_server(settings, model_path, log_dir) as server:
        async with get_backend("openai", server.url, api_key=server.api_key) as backend:
            calibration = await calibrate(backend, report, requests_fn)
        return calibration, await asyncio.to_thread(_base_bytes, server)


def model_file(settings: BatchSettings) -> Path:
    """The GGUF the embedded server loads: --model-path, or the default model (its first use checks the package's
    checksum: seconds, so async callers run this on a thread)."""
    return Path(settings.server.model_path) if settings.server.model_path else default_model_path()


def probe_base(settings: BatchSettings, log_dir: Path) -> float:
    """The base memory alone (a Ray actor plans for its own node with it)."""
    model_path = model_file(settings)
    with _probe_server(settings, model_path, log_dir) as server:
        return _base_bytes(server)


async def prepare(settings: BatchSettings, report: InputReport, requests_fn, specs: list[EndpointSpec],
                  log_dir: Path) -> Prepared:  # fmt: skip
    first = specs[0]
    base_bytes = 0.0
    if first.kind in ("embedded", "ray"):
        model_path = await asyncio.to_thread(model_file, settings)
        calibration, base_bytes = await _sizes_from_embedded(settings, report, requests_fn, model_path, log_dir)
    elif first.backend == "ollama":
        async with get_backend("ollama", first.url, model=first.model, api_key=first.api_key()) as ollama:
            gguf = await ollama.model_file() if first.model else None
        calibration = None
        if gguf:
            local = dataclasses.replace(settings, server=replace(settings.server, gpu_layers=0))
            try:
                calibration, _ = await _sizes_from_embedded(local, report, requests_fn, Path(gguf), log_dir)
                calibration.source = "the model's own tokenizer (its GGUF, on this machine)"
            except ServerStartError:
                calibration = None  # no embedded server to tokenize with: the server's own counts calibrate
        if calibration is None:
            calibration = await calibrate(None, report, requests_fn)
    else:
        async with get_backend(first.backend, first.url, model=first.model, api_key=first.api_key()) as backend:
            calibration = await calibrate(backend, report, requests_fn)
    system_tokens = max(calibration.prefix_tokens.values(), default=0)
    sizes = size_profile(report, system_tokens, calibration.chars_per_token, calibration.source,
                         settings.default_max_tokens)  # fmt: skip
    plans = []
    embedded_count = sum(1 for s in specs if s.kind == "embedded" and s.gpu is None)
    for spec in specs:
        if spec.kind in ("embedded", "ray"):
            plans.append(await _embedded_plan(settings, sizes, spec, base_bytes, embedded_count))
        elif spec.backend == "ollama":
            plans.append(await _ollama_plan(settings, sizes, spec))
        else:
            plans.append(await _openai_plan(settings, sizes, spec))
    return Prepared(plans, sizes, calibration)
