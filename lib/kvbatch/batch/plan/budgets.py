"""The memory a server's plan must fit: the user's --memory-budget, the memory cap, the card, or this machine's
RAM (shared by the servers that run on it), and for Ollama what it reports of the model it holds."""

from __future__ import annotations

import dataclasses

from kvbatch.batch.inputs.endpoints import EndpointSpec
from kvbatch.batch.settings import BatchSettings
from kvbatch.measure.budget import Budget, default_budget, gpu_budget, ram_budget, resolve_budget
from kvbatch.measure.result import Measurement
from kvbatch.serve.backends.base import is_local
from kvbatch.units import format_bytes


def shared(budget: Budget, share: int) -> Budget:
    """A budget split evenly between `share` servers on one memory."""
    if share <= 1:
        return budget
    value = budget.bytes // share
    return dataclasses.replace(budget, bytes=value, text=f"{budget.text} / {share} servers")


def embedded_budget(settings: BatchSettings, gpu: int | None, *, on_gpu: bool, share: int) -> Budget:
    """For an embedded server (on card `gpu`, or one of `share` servers on this machine's memory)."""
    if settings.memory_budget:
        budget = resolve_budget(settings.memory_budget, on_gpu=on_gpu)
        return budget if gpu is not None else shared(budget, share)  # servers on one memory share it
    if settings.server.memory_cap_bytes:
        cap = settings.server.memory_cap_bytes
        return Budget(cap, f"{format_bytes(cap)} (--memory-cap, of address space)", "user")
    if gpu is not None:
        return gpu_budget(gpu) or ram_budget()
    return shared(default_budget(on_gpu), share)


def ollama_budget(settings: BatchSettings, spec: EndpointSpec, measurement: Measurement | None, *, on_gpu: bool,
                  model_vram_bytes: int | None) -> Budget | None:  # fmt: skip
    """For an Ollama server; None when its memory is not ours to read (a remote server, no --memory-budget).
    `model_vram_bytes`: what the model it holds takes on the card now (ours to re-plan, not another process's)."""
    if settings.memory_budget:
        return resolve_budget(settings.memory_budget, on_gpu=on_gpu)
    if on_gpu:
        budget = gpu_budget()
        if budget and model_vram_bytes:
            budget = dataclasses.replace(budget, bytes=budget.bytes + model_vram_bytes,
                                         text=f"{budget.text} (+ {spec.model} itself)")  # fmt: skip
        return budget
    if measurement is not None and measurement.budget_bytes and not measurement.budget_is_demo:
        return Budget(measurement.budget_bytes, f"{measurement.budget} (from the measurement)", "user")
    if is_local(spec.url):
        return ram_budget()
    return None
