"""`kvbatch measure`: the measurement notebooks, headless."""

from __future__ import annotations

import argparse

from kvbatch.errors import UserInputError
from kvbatch.report.measure_reports import run_measurement_notebooks


def cmd_measure(args: argparse.Namespace) -> int:
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError as exc:
        raise UserInputError(f"--contexts: {args.contexts!r} is not a comma-separated list of numbers") from exc
    if args.backend == "ollama" and not (args.url and args.model):
        raise UserInputError("--backend ollama needs --url and --model")
    for line in run_measurement_notebooks(
        backend=args.backend, url=args.url, model=args.model, model_path=args.model_path, kv_type=args.kv_type,
        parallel=args.parallel, contexts=contexts, repeats=args.repeats, budget=args.budget, margin=args.margin,
        duration_s=args.duration, ceiling_s=args.ceiling, fill_context=args.fill_context, input_path=args.input,
        only=[s.strip() for s in args.only.split(",") if s.strip()],
    ):  # fmt: skip
        print(line, flush=True)
    return 0
