"""A short-lived embedded server before the run: the model's own tokenizer for the batch's token sizes, and the
memory the model holds before any KV cache (the base of a plan made without a measurement)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from kvbatch import defaults
from kvbatch.batch.inputs.requests import InputReport
from kvbatch.batch.inputs.tokens import Calibration, calibrate
from kvbatch.batch.plan.memory import ServingMemory
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import KvbatchError
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.config import build_has_gpu
from kvbatch.serve.probes import probe_for_server
from kvbatch.serve.server import EmbeddedServer, default_model_path


@dataclass(frozen=True)
class BaseReading:
    """What the probe server showed of the model's memory: its base before any KV cache, and what serving adds."""

    base_bytes: float
    serving: ServingMemory
    prompt_tokens_per_s: float | None = None
    """The probe's own speeds on one timed request at 1 slot: the estimate of a plan made without a measurement."""
    answer_tokens_per_s: float | None = None


def model_file(settings: BatchSettings) -> Path:
    """The GGUF the embedded server loads: --model-path, or the default model (its first use checks the package's
    checksum: seconds, so async callers run this on a thread)."""
    return Path(settings.server.model_path) if settings.server.model_path else default_model_path()


def _probe_server(settings: BatchSettings, model_path: Path, log_dir: Path) -> EmbeddedServer:
    """A short-lived server at a small context, one slot, no warm-up: for the tokenizer and the base memory."""
    config = replace(settings.server, model_path=model_path, context_tokens=defaults.PROBE_CONTEXT, parallel_slots=1,
                     memory_cap_bytes=None, extra_args=[*settings.server.extra_args, "--no-warmup"])  # fmt: skip
    return EmbeddedServer(config, log_path=log_dir / "probe-server.log")


def _read_base(server: EmbeddedServer) -> BaseReading:
    """What the model holds before any KV cache (the server's memory less its logged KV buffers), and the
    buffers its log says serving will touch."""
    log = server.log()
    on_gpu = build_has_gpu() and server.config.gpu_layers != 0 and log.on_gpu
    serving = ServingMemory.from_probe_log(log, probe_context=server.config.context_tokens, on_gpu=on_gpu)
    return BaseReading(float(probe_for_server(server.pid, server.log_text).read() - log.kv_total_bytes), serving)


async def sizes_from_embedded(
    settings: BatchSettings, report: InputReport, requests_fn, model_path: Path, log_dir: Path, *, base: bool = True
) -> tuple[Calibration, BaseReading | None]:
    """The real tokenizer, and (with `base`) the memory the model needs before any KV, from one probe server."""
    async with _probe_server(settings, model_path, log_dir) as server:
        async with get_backend("openai", server.url, options=BackendOptions(api_key=server.api_key)) as backend:
            calibration = await calibrate(backend, report, requests_fn)
            if not base:
                return calibration, None
            reading = await asyncio.to_thread(_read_base, server)  # before the timed request touches any buffer
            try:  # the first request pages the weights in (a fresh clone's model file is not in the page cache yet)
                await backend.speeds(defaults.PROBE_SPEED_PROMPT_TOKENS, 1)
                prompt_speed, answer_speed = await backend.speeds(defaults.PROBE_SPEED_PROMPT_TOKENS,
                                                                  defaults.PROBE_SPEED_ANSWER_TOKENS)  # fmt: skip
            except KvbatchError:  # no speeds: the plan says so, and the run estimates from its own rate
                return calibration, reading
        return calibration, replace(reading, prompt_tokens_per_s=prompt_speed, answer_tokens_per_s=answer_speed)


def probe_base(settings: BatchSettings, log_dir: Path) -> BaseReading:
    """The base memory alone (a Ray actor plans for its own node with it)."""
    model_path = model_file(settings)
    with _probe_server(settings, model_path, log_dir) as server:
        return _read_base(server)
