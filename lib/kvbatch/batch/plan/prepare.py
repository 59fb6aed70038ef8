"""Before the first request: learn the real token sizes (probe.py), then make each server's plan
(server_plans.py, against budgets.py's budget)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

from kvbatch.batch.inputs.endpoints import EndpointSpec, backend_for
from kvbatch.batch.inputs.requests import InputReport
from kvbatch.batch.inputs.sizes import SizeProfile, size_profile
from kvbatch.batch.inputs.tokens import Calibration, calibrate
from kvbatch.batch.plan.plan import Plan
from kvbatch.batch.plan.probe import BaseReading, model_file, sizes_from_embedded
from kvbatch.batch.plan.server_plans import EndpointPlan, embedded_plan, ollama_plan, openai_plan, ray_plan
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import ServerStartError


@dataclass
class Prepared:
    plans: list[EndpointPlan]
    sizes: SizeProfile
    calibration: Calibration

    @property
    def plan(self) -> Plan:
        return self.plans[0].plan


def model_identity(settings: BatchSettings, spec: EndpointSpec) -> str:
    """Backend, model and KV cache types, for the run's fingerprint (not the address: a server may move). It is
    made from the command line alone, so a resume while a server is down is not refused for that."""
    if spec.kind == "external":
        return f"{spec.backend}:{spec.model or 'server-default'}:{settings.kv_type}"
    model = model_file(settings).name
    return f"{spec.kind}:{model}:{settings.kv_type}{'-swafull' if settings.server.swa_full else ''}"


async def prepare(settings: BatchSettings, report: InputReport, requests_fn, specs: list[EndpointSpec],
                  log_dir: Path) -> Prepared:  # fmt: skip
    """Token sizes from the model's own tokenizer where there is one, then each endpoint's plan."""
    first = specs[0]
    base: BaseReading | None = None
    if first.kind in ("embedded", "ray"):
        model_path = await asyncio.to_thread(model_file, settings)
        calibration, base = await sizes_from_embedded(settings, report, requests_fn, model_path, log_dir,
                                                            base=any(s.kind == "embedded" for s in specs))  # fmt: skip
    elif first.backend == "ollama":
        async with backend_for(first, settings.backend_options()) as ollama:
            gguf = await ollama.model_file() if first.model else None
        calibration = None
        if gguf:
            local = dataclasses.replace(settings, server=replace(settings.server, gpu_layers=0))
            try:
                calibration, _ = await sizes_from_embedded(local, report, requests_fn, Path(gguf), log_dir, base=False)
                calibration.source = "the model's own tokenizer (its GGUF, on this machine)"
            except ServerStartError:
                calibration = None  # no embedded server to tokenize with: the server's own counts calibrate
        if calibration is None:
            calibration = await calibrate(None, report, requests_fn)
    else:
        async with backend_for(first, settings.backend_options()) as backend:
            calibration = await calibrate(backend, report, requests_fn)
    system_tokens = max(calibration.prefix_tokens.values(), default=0)
    sizes = size_profile(report, system_tokens, calibration.chars_per_token, calibration.source,
                         settings.default_max_tokens)  # fmt: skip
    plans = []
    embedded_count = sum(1 for s in specs if s.kind == "embedded" and s.gpu is None)
    for spec in specs:
        if spec.kind == "embedded":
            plans.append(await embedded_plan(settings, sizes, spec, base, embedded_count))
        elif spec.kind == "ray":
            plans.append(ray_plan(settings, sizes, spec))
        elif spec.backend == "ollama":
            plans.append(await ollama_plan(settings, sizes, spec))
        else:
            plans.append(await openai_plan(settings, sizes, spec))
    return Prepared(plans, sizes, calibration)
