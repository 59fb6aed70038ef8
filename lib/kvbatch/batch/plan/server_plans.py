"""Each kind of server's plan: an embedded server's (from a measurement, or the GGUF's architecture and a probe
of the base memory, against its budget), Ollama's (its own settings and /api/ps), a running OpenAI-compatible
server's (the limits it reports), and Ray's (planned by each actor on its node)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from kvbatch import defaults
from kvbatch.batch.inputs.endpoints import EndpointSpec, backend_for
from kvbatch.batch.inputs.sizes import SizeProfile
from kvbatch.batch.plan.budgets import embedded_budget, ollama_budget
from kvbatch.batch.plan.memory import MemoryModel
from kvbatch.batch.plan.plan import Plan, PlanInputs, make_plan
from kvbatch.batch.plan.probe import BaseReading, model_file
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import UserInputError
from kvbatch.measure.budget import Budget
from kvbatch.measure.kvmodel import KvArchitecture, KvCacheTypes, architecture_from_gguf, architecture_from_metadata
from kvbatch.measure.kvmodel import kv_cache as kv_cache_of
from kvbatch.measure.ollama_settings import ollama_settings
from kvbatch.measure.result import Measurement, find_measurement, load_measurement, measurement_path
from kvbatch.serve.backends import Backend, ServerLimits
from kvbatch.serve.backends.base import is_local
from kvbatch.serve.backends.ollama_native import counts_only_uncached
from kvbatch.serve.config import ServerConfig, build_has_gpu
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.probes import nvml_available


@dataclass
class EndpointPlan:
    spec: EndpointSpec
    plan: Plan
    config: ServerConfig | None = None
    """The embedded server's settings (cache types from the plan); None for a running server."""
    backend: Backend | None = None
    """A running server's backend, built while planning and used by the run."""


def kv_candidates(kv_type: str) -> tuple[KvCacheTypes, ...]:
    if kv_type == "auto":
        return tuple(KvCacheTypes(kind, kind) for kind in defaults.KV_TYPES_AUTO)
    return (KvCacheTypes(kv_type, kv_type),)


def _load_measurement(path: Path) -> tuple[Measurement | None, str | None, str | None]:
    """The measurement at `path` if it holds a fit, with the file name and why it was (not) used."""
    if not path.exists():
        return None, None, f"none at {path}: planned from the architecture and a quick probe of the base memory"
    measurement = load_measurement(path)
    if not measurement.kv_bytes_per_token or measurement.base_bytes is None:
        return None, str(path), "it holds no fit yet (run the kv_growth notebook): planned from the architecture"
    return measurement, str(path), None


def _inputs(settings: BatchSettings, memory: MemoryModel | None, budget: Budget | None,
            measurement: Measurement | None, path: str | None, reason: str | None, *,
            probed: BaseReading | None = None, **extra) -> PlanInputs:  # fmt: skip
    speeds: dict = {}
    if probed is not None and probed.prompt_tokens_per_s and probed.answer_tokens_per_s:  # a measurement's win
        speeds["seconds_per_prompt_token"] = 1 / probed.prompt_tokens_per_s
        speeds["seconds_per_answer_token"] = 1 / probed.answer_tokens_per_s
        speeds["speeds_source"] = (f"the probe server's own speeds at 1 slot (prompt {probed.prompt_tokens_per_s:.0f} "
                                   f"tokens/s, answers {probed.answer_tokens_per_s:.1f} tokens/s)")  # fmt: skip
    if measurement is not None:
        sustained = measurement.sustained
        if sustained and sustained.passed and sustained.requests_per_s:
            speeds["sustained_rate"] = (sustained.slots, sustained.slot_context_tokens, sustained.requests_per_s)
        if measurement.prompt_tokens_per_s and measurement.answer_tokens_per_s:
            speeds["seconds_per_prompt_token"] = 1 / measurement.prompt_tokens_per_s
            speeds["seconds_per_answer_token"] = 1 / measurement.answer_tokens_per_s
            speeds["speeds_source"] = "measured token speeds"
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


async def embedded_plan(settings: BatchSettings, sizes: SizeProfile, spec: EndpointSpec, base: BaseReading | None,
                        share: int) -> EndpointPlan:  # fmt: skip
    """A plan for an embedded server on this machine (or card `spec.gpu`), one of `share` on its memory: from the
    measurement of this model and cache type when there is one, else from the GGUF's architecture and the probe's
    base; either way with what the probe's log says serving adds (the plan bounds the peak)."""
    model_path = await asyncio.to_thread(model_file, settings)
    arch = await asyncio.to_thread(architecture_from_gguf, model_path)
    candidates = kv_candidates(settings.kv_type)
    on_gpu = build_has_gpu() and settings.server.gpu_layers != 0
    types = replace(candidates[0], swa_full=settings.server.swa_full)
    path = settings.measurement_path or find_measurement("embedded", model_path.name, types)
    measurement, shown, reason = _load_measurement(path)
    budget = embedded_budget(settings, spec.gpu, on_gpu=on_gpu, share=share)
    serving = replace(base.serving, json_answers=sizes.json_answers > 0) if base else None
    options = {"checkpoints_in_budget": not on_gpu, "ctx_checkpoints": settings.server.ctx_checkpoints or 0,
               "serving": serving}  # fmt: skip
    if measurement is not None:
        memory = MemoryModel.from_measurement(arch, measurement, types, **options)
    else:
        memory = MemoryModel(arch, base.base_bytes if base else 0.0, types,
                             source="predicted from the GGUF, base from a quick probe", **options)  # fmt: skip
    inputs = _inputs(settings, memory, budget, measurement, shown, reason, probed=base, slots_speed_up=on_gpu,
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


async def ollama_plan(settings: BatchSettings, sizes: SizeProfile, spec: EndpointSpec) -> EndpointPlan:
    if not spec.model:
        raise UserInputError("--backend ollama needs --model (the Ollama model name, e.g. gemma3:12b)")
    backend = backend_for(spec, settings.backend_options())
    arch = architecture_from_metadata(await backend.model_info(), source=f"{backend.base_url} /api/show {spec.model}")
    given = settings.kv_type if settings.kv_type_given and settings.kv_type != "auto" else None
    server = await ollama_settings(backend, arch, kv_type=given,
                                   parallel=settings.parallel, trained_context=arch.context_length_trained)  # fmt: skip
    types, parallel = server.types, server.parallel
    path = settings.measurement_path or measurement_path("ollama", spec.model, types)
    measurement, shown, reason = _load_measurement(path)
    on_gpu = is_local(spec.url) and nvml_available()
    if measurement is not None:
        memory = MemoryModel.from_measurement(arch, measurement, types, checkpoints_in_budget=False, ctx_checkpoints=0)
    else:
        base = await _ollama_base(backend, arch, types, parallel)
        memory = MemoryModel(arch, base, types, checkpoints_in_budget=False, ctx_checkpoints=0,
                             source="predicted from /api/show, base from /api/ps")  # fmt: skip
    loaded = await backend.loaded() if on_gpu and not settings.memory_budget else None
    budget = ollama_budget(settings, spec, measurement, on_gpu=on_gpu, model_vram_bytes=loaded.vram_bytes
                           if loaded else None)  # fmt: skip
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
        limits_source=f"{memory.source}; OLLAMA_NUM_PARALLEL={parallel}, cache {types.label} ({server.source})",
    )
    if budget is None:
        inputs.server_limits = ServerLimits(slots=parallel, slot_context_tokens=None, server_kind="ollama",
                                            sources={"slots": server.source})  # fmt: skip
    plan = _plan(settings, sizes, inputs)
    if budget is None:
        plan.notes.append("the server's memory is not ours to read: give --memory-budget (its card's) to plan it")
    version = await backend.server_version()
    if counts_only_uncached(version):
        plan.notes.append(
            f"Ollama {'.'.join(map(str, version))} counts only the prompt tokens it evaluates anew in "
            "prompt_eval_count (not those from its prefix cache): the truncation guard counts each request's "
            "shared prefix as cached, and `truncate: false` has Ollama refuse, not cut, a prompt too long"
        )
    backend.layout = plan.layout
    return EndpointPlan(spec, plan, backend=backend)


async def openai_plan(settings: BatchSettings, sizes: SizeProfile, spec: EndpointSpec) -> EndpointPlan:
    backend = backend_for(spec, settings.backend_options())
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


def ray_plan(settings: BatchSettings, sizes: SizeProfile, spec: EndpointSpec) -> EndpointPlan:
    """Ray actors plan for their own nodes (their memory, their cards) when they start: the driver does not plan
    for its own hardware. Until they report, the plan holds the batch's sizes and says so; plan.json is written
    again with each actor's layout once they run."""
    wanted = settings.slot_context_tokens or sizes.longest_request_tokens
    limits = ServerLimits(
        slots=settings.slots or 1,
        slot_context_tokens=wanted,
        server_kind="ray",
        sources={"slots": "each actor's own plan", "slot_context_tokens": "each actor's own plan"},
    )
    inputs = PlanInputs(server_limits=limits, limits_source="each Ray actor plans for its own node when it starts",
                        measurement_reason="each Ray actor plans from its own node's memory")  # fmt: skip
    return EndpointPlan(spec, _plan(settings, sizes, inputs))
