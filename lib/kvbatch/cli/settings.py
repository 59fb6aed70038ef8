"""What the command line's flags mean as settings: the embedded server's `ServerConfig` and a batch's
`BatchSettings`, each flag checked with a one-sentence message naming it."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvbatch import defaults
from kvbatch.batch.runfolder import RunFolder
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import UserInputError
from kvbatch.serve.config import ServerConfig
from kvbatch.units import parse_bytes


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    kv_type = getattr(args, "kv_type", None) or "f16"
    kv_type = "f16" if kv_type == "auto" else kv_type
    return ServerConfig(
        model_path=Path(args.model_path) if args.model_path else None,
        context_tokens=getattr(args, "ctx", defaults.CONTEXT_TOKENS),
        parallel_slots=getattr(args, "parallel", None) or 1,
        cache_type_k=kv_type,
        cache_type_v=kv_type,
        swa_full=args.swa_full,
        flash_attention=args.flash_attn,
        memory_cap_bytes=parse_bytes(args.memory_cap, what="--memory-cap") if args.memory_cap else None,
        threads=args.threads,
        ctx_checkpoints=args.ctx_checkpoints,
        gpu_layers=args.gpu_layers,
        binary=Path(args.server_binary) if args.server_binary else None,
        port=getattr(args, "port", None),
    )


def settings_from_args(args: argparse.Namespace) -> BatchSettings:
    concurrency: int | str = args.concurrency
    if concurrency != "auto":
        try:
            concurrency = int(concurrency)
        except ValueError as exc:
            raise UserInputError(f"--concurrency: {args.concurrency!r} is neither a number nor auto") from exc
    if args.answer_attempts < 1:
        raise UserInputError("--answer-attempts: must be at least 1")
    if args.slot_ctx is not None and args.slot_ctx < 256:
        raise UserInputError("--slot-ctx: must be at least 256 tokens")
    generation = {key: value for key, value in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
                  if value is not None}  # fmt: skip
    threshold = None
    if args.memory_threshold:
        threshold = parse_bytes(args.memory_threshold, what="--memory-threshold")
    elif args.memory_budget:
        threshold = int(parse_bytes(args.memory_budget, what="--memory-budget") * defaults.MEMORY_THRESHOLD_OF_BUDGET)
    return BatchSettings(
        input_path=Path(args.input),
        folder=RunFolder.named(args.run, Path(args.input)),
        system_prompt_path=Path(args.system_prompt) if args.system_prompt else None,
        template=args.template,
        id_column=args.id_column,
        schema_path=Path(args.schema) if args.schema else None,
        mode=args.mode,
        concurrency=concurrency,
        slots=args.slots or (concurrency if isinstance(concurrency, int) else None),
        slot_context_tokens=args.slot_ctx,
        kv_type=args.kv_type or "f16",
        kv_type_given=args.kv_type is not None,
        urls=args.url or [],
        endpoints_file=Path(args.endpoints) if args.endpoints else None,
        backend=args.backend,
        model=args.model,
        servers=args.servers,
        ray=args.ray,
        ray_actors=args.ray_actors,
        parallel=args.parallel,
        server=server_config_from_args(args),
        memory_budget=args.memory_budget,
        safety_margin=args.safety_margin,
        measurement_path=Path(args.measurements) if args.measurements else None,
        generation=generation,
        max_attempts=args.max_attempts,
        answer_attempts=args.answer_attempts,
        max_wait_s=args.max_wait,
        request_timeout_s=args.request_timeout,
        retry_failed=getattr(args, "retry_failed", False),
        progress=not args.no_progress,
        memory_threshold_bytes=threshold,
        memory_sample_s=args.memory_sample_s,
        restart_above_bytes=parse_bytes(args.restart_above, what="--restart-above") if args.restart_above else None,
        allow_cpu_spill=args.allow_cpu_spill,
    )
