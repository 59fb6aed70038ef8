"""The `kvbatch` command. The library raises; only this module prints, one sentence per mistake."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvbatch import defaults
from kvbatch.errors import (
    EXIT_CODES_HELP,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_SOME_FAILED,
    KvbatchError,
    UserInputError,
    exit_code,
)

KV_TYPE_CHOICES = ("f16", "q8_0", "q4_0", "bf16", "f32", "auto")


def _add_server_flags(parser: argparse.ArgumentParser, *, with_context: bool) -> None:
    group = parser.add_argument_group("embedded server")
    group.add_argument("--model-path", help="GGUF file (default: Gemma 3 270M Q4_K_M from the model package)")
    if with_context:
        group.add_argument("--ctx", type=int, default=defaults.CONTEXT_TOKENS,
                           help="total context tokens (split across --parallel slots)")  # fmt: skip
        group.add_argument("--parallel", type=int, default=1, help="parallel slots")
        group.add_argument("--kv-type", default="f16", choices=KV_TYPE_CHOICES[:-1], help="KV cache type")
        group.add_argument("--port", type=int, default=None)
    group.add_argument("--swa-full", action="store_true", help="full-size cache for sliding-window layers")
    group.add_argument("--flash-attn", default="auto", choices=("on", "off", "auto"))
    group.add_argument("--memory-cap", default=None, help="hard address-space cap on the server, e.g. 1.5GiB")
    group.add_argument("--threads", type=int, default=None)
    group.add_argument(
        "--ctx-checkpoints",
        type=int,
        default=defaults.CTX_CHECKPOINTS,
        help=f"context checkpoints per slot (default {defaults.CTX_CHECKPOINTS}; the server's own: 32)",
    )
    group.add_argument("--gpu-layers", type=int, default=None, help="layers on the GPU (default: all, on a GPU build)")
    group.add_argument("--server-binary", default=None, help="a llama-server of your own (default: make setup's)")


def server_config_from_args(args: argparse.Namespace):
    from kvbatch.serve.config import ServerConfig
    from kvbatch.units import parse_bytes

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


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the embedded llama-server in the foreground until Ctrl-C."""
    from kvbatch.serve.build import build_summary
    from kvbatch.serve.server import EmbeddedServer

    server = EmbeddedServer(server_config_from_args(args))
    with server:
        log = server.log()
        print(f"llama-server ready at {server.url} (pid {server.pid}, started in {server.start_time_s:.1f} s)")
        print(f"  build: {build_summary()['build']}")
        print(f"  OpenAI-compatible: {server.url}/v1/chat/completions   health: {server.url}/health")
        print(f"  API key (send as 'Authorization: Bearer KEY'): {server.api_key}")
        print(f"  KV cache: {log.kv_total_bytes / 2**20:.1f} MiB; slot context: {log.slot_context_tokens or '?'}")
        print(f"  log: {server.log_path}   Ctrl-C stops it", flush=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"] and server.is_running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        if not server.is_running():
            print(f"llama-server exited on its own; see {server.log_path}", file=sys.stderr)
            return 1
    print("llama-server stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the embedded llama-server and print its URL")
    _add_server_flags(serve, with_context=True)
    serve.set_defaults(handler=cmd_serve)

    run = commands.add_parser("run", help="run a batch (the same command again resumes it)", epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _add_batch_flags(run)
    run.add_argument("--no-report", action="store_true", help="skip rendering the HTML run report")
    run.add_argument("--retry-failed", action="store_true", help="send the requests in errors.jsonl again")
    run.set_defaults(handler=cmd_run)

    plan = commands.add_parser("plan", help="validate the input and print the plan, without running it")
    _add_batch_flags(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (plan.json's model)")
    plan.set_defaults(handler=cmd_plan)

    sample = commands.add_parser("sample", help="write a synthetic candidate-screening batch of any size")
    sample.add_argument("--n", type=int, default=16)
    sample.add_argument("--out", default=str(defaults.SAMPLE_INPUT))
    sample.add_argument("--max-tokens", type=int, default=300)
    sample.add_argument("--seed", type=int, default=1)
    sample.add_argument("--json", action="store_true",
                        help="each request asks for a JSON decision with a schema (response_format)")
    sample.set_defaults(handler=cmd_sample)

    measure = commands.add_parser("measure", help="run the measurement notebooks headless; reports in reports/")
    measure.add_argument("--backend", default="embedded", choices=("embedded", "ollama"))
    measure.add_argument("--url", default=None, help="Ollama URL (with --backend ollama)")
    measure.add_argument("--model", default=None, help="Ollama model name (with --backend ollama)")
    measure.add_argument("--model-path", default=None, help="GGUF for the embedded server")
    measure.add_argument(
        "--kv-type",
        default=None,
        help="KV cache type (Ollama: its OLLAMA_KV_CACHE_TYPE; default: inferred from its sizes)",
    )
    measure.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="Ollama's OLLAMA_NUM_PARALLEL, set on the server (default: inferred from its sizes)",
    )
    measure.add_argument("--contexts", default="2048,8192,16384,32768", help="sweep A context sizes, comma-separated")
    measure.add_argument("--repeats", type=int, default=2)
    measure.add_argument("--fill-context", type=int, default=defaults.CONTEXT_TOKENS,
                         help="the allocation sweep B fills step by step (memory against tokens in use)")  # fmt: skip
    measure.add_argument("--budget", default=defaults.DEMO_BUDGET,
                         help="memory the server may use (8GiB, auto for the machine's default), or +24MiB above "
                              "the model's own need (the 2-core demo, the default)")  # fmt: skip
    measure.add_argument("--margin", type=float, default=defaults.SAFETY_MARGIN,
                         help="safety margin applied to the largest context")  # fmt: skip
    measure.add_argument("--duration", type=float, default=defaults.SUSTAINED_DURATION_S,
                         help="the least seconds of sustained load (it goes on until every slot has served its "
                              "context once)")  # fmt: skip
    measure.add_argument("--ceiling", type=float, default=defaults.SUSTAINED_CEILING_S,
                         help="the most seconds of sustained load; stopped there before every slot was filled, it "
                              "does not pass")  # fmt: skip
    measure.add_argument(
        "--input",
        default=str(defaults.SAMPLE_INPUT),
        help="batch whose request sizes the sustained load runs (default: the shipped sample)",
    )
    measure.add_argument("--only", default="kv_growth,safe_context,sustained_load",
                         help="which notebooks to run, comma-separated")  # fmt: skip
    measure.set_defaults(handler=cmd_measure)

    report = commands.add_parser("report", help="render (again) the HTML report of a run")
    report.add_argument("--run", default=None, help="run folder or name under data/runs (default: the newest)")
    report.set_defaults(handler=cmd_report)

    api = commands.add_parser("api", help="serve the OpenAI Batch API on this machine (files, batches, a status page)")
    _add_batch_flags(api, with_input=False)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=defaults.API_PORT)
    api.add_argument("--data", default=str(defaults.API_DATA_DIR), help="store folder (SQLite, files, run folders)")
    api.add_argument("--api-key-env", default=None,
                     help="environment variable holding the key clients must send (needed beyond loopback)")
    api.add_argument("--webhook-url", default=None, help="POST batch.completed/failed/cancelled events here")
    api.add_argument("--webhook-secret-env", default=None,
                     help="environment variable holding the webhook signing secret (Standard Webhooks)")
    api.add_argument("--no-report", action="store_true", help="skip rendering each batch's HTML report")
    api.set_defaults(handler=cmd_api)

    export = commands.add_parser("export", help="write a run's answers as one table (a row per custom_id)")
    export.add_argument("run", help="run folder or name under data/runs")
    export.add_argument("--format", default=None, choices=("csv", "parquet", "jsonl"),
                        help="default: from the --out file's suffix")  # fmt: skip
    export.add_argument("--out", required=True, help="file to write")
    export.set_defaults(handler=cmd_export)
    return parser


def _add_batch_flags(parser: argparse.ArgumentParser, *, with_input: bool = True) -> None:
    if with_input:
        parser.add_argument("input",
                            help="OpenAI Batch JSONL, or a CSV/JSONL table with --system-prompt and --template")
        parser.add_argument("--run", default=None,
                            help="run folder or name under data/runs (default: from the input name)")
        parser.add_argument("--system-prompt", default=None, help="system prompt file (table input)")
        parser.add_argument("--template", default=None,
                            help="user message template with {column} fields (table input)")
        parser.add_argument("--id-column", default=None, help="table column to use as custom_id (default: row-N)")
        parser.add_argument("--schema", default=None,
                            help="JSON Schema file every answer of a table input must keep to (checked, asked again)")
    else:
        parser.set_defaults(input=None, run=None, system_prompt=None, template=None, id_column=None, schema=None)
    parser.add_argument("--mode", default="independent", choices=("independent", "conversation"))
    parser.add_argument("--concurrency", default="auto",
                        help="requests in flight per server, or auto (measure and keep the fastest)")  # fmt: skip
    parser.add_argument("--slots", type=int, default=None, help="parallel slots (default: as many as fit)")
    parser.add_argument("--slot-ctx", type=int, default=None, help="per-slot context (default: planned)")
    parser.add_argument("--kv-type", default=None, choices=KV_TYPE_CHOICES,
                        help="KV cache type (default f16); auto takes the one that fits the most slots; for Ollama, "
                        "the server's OLLAMA_KV_CACHE_TYPE (default: inferred from its sizes)")  # fmt: skip
    servers = parser.add_argument_group("servers")
    servers.add_argument("--url", action="append", default=None,
                         help="a running server instead of the embedded one (repeat for several)")  # fmt: skip
    servers.add_argument("--endpoints", default=None, help="TOML file listing servers ([[endpoint]] tables)")
    servers.add_argument("--backend", default="openai", help="openai (any /v1 server) or ollama (native API)")
    servers.add_argument("--model", default=None, help="model name on the external server")
    servers.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="Ollama's OLLAMA_NUM_PARALLEL, set on the server (default: inferred from its sizes)",
    )
    servers.add_argument("--servers", default=None, help="embedded servers to start: N, or per-gpu")
    servers.add_argument("--ray", default=None, help="run on a Ray cluster: ADDRESS, or auto (needs the ray extra)")
    servers.add_argument("--ray-actors", type=int, default=None,
                         help="server actors on Ray (default: one per GPU, else one per node)")  # fmt: skip
    servers.add_argument("--allow-cpu-spill", action="store_true",
                         help="run even when Ollama puts part of the model on the CPU (slower)")  # fmt: skip
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="memory the server may use, e.g. 8GiB (default: a GPU's x 0.9, else available RAM)",
    )
    parser.add_argument("--safety-margin", type=float, default=defaults.SAFETY_MARGIN)
    parser.add_argument("--measurements", default=None,
                        help="measurement file (default: data/measurements/ for the model)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=None, help="override max_tokens of every request")
    parser.add_argument("--temperature", type=float, default=None, help="override temperature of every request")
    parser.add_argument("--max-attempts", type=int, default=defaults.MAX_ATTEMPTS,
                        help="crashes a request may cause alone before it fails for good")  # fmt: skip
    parser.add_argument("--answer-attempts", type=int, default=defaults.ANSWER_ATTEMPTS,
                        help="answers asked for until one keeps to the request's response_format (JSON, its schema)")
    parser.add_argument("--max-wait", type=float, default=defaults.MAX_WAIT_S,
                        help="seconds to wait out transient failures before stopping (default 1800)")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=defaults.REQUEST_TIMEOUT_S,
                        help="seconds one request may take")  # fmt: skip
    parser.add_argument("--memory-threshold", default=None,
                        help="server memory above which the run reacts (ends conversation chunks early, lowers the "
                             "in-flight count), e.g. 6GiB; default: 95 %% of --memory-budget if given")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    _add_server_flags(parser, with_context=False)


def settings_from_args(args: argparse.Namespace):
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.batch.settings import BatchSettings
    from kvbatch.units import parse_bytes

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
        threshold = int(parse_bytes(args.memory_budget, what="--memory-budget") * 0.95)
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
        allow_cpu_spill=args.allow_cpu_spill,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from kvbatch.batch.runner import run_batch

    settings = settings_from_args(args)
    try:
        outcome = run_batch(settings)
    except KeyboardInterrupt:  # summary.json is written for what was done; the report too
        print("stopped (Ctrl-C). Every finished request is saved; run the same command to resume.", file=sys.stderr)
        if settings.folder.summary.exists() and not args.no_report:
            _report(settings.folder.path)
        return EXIT_INTERRUPTED
    print(outcome.message)
    if outcome.plan is None and outcome.summary is None:
        return EXIT_DONE
    if not args.no_report:
        _report(outcome.folder.path)
    if outcome.stopped is not None:
        print(f"kvbatch run: stopped: {outcome.stopped}", file=sys.stderr)
        return exit_code(outcome.stopped)
    return EXIT_SOME_FAILED if outcome.summary and outcome.summary.failed_total else EXIT_DONE


def _report(run_dir: Path) -> None:
    from kvbatch.report.render import render_run_report

    try:
        print(f"report: {render_run_report(run_dir)}")
    except KvbatchError as exc:  # the run's results stand: say why there is no report, and how to make it
        print(f"no report ({exc}); make it later with `kvbatch report --run {run_dir}`")


def cmd_plan(args: argparse.Namespace) -> int:
    from kvbatch.batch.runner import plan_only
    from kvbatch.serve.backends import public_url

    quiet = args.json
    prepared = plan_only(settings_from_args(args), say=(lambda *_: None) if quiet else print)
    if quiet:
        records = [endpoint.plan.record().model_dump() for endpoint in prepared.plans]
        import json

        print(json.dumps({**records[0], "endpoints": records} if len(records) > 1 else records[0], indent=2))
        return 0
    for index, endpoint in enumerate(prepared.plans):
        if len(prepared.plans) > 1:
            print(f"[endpoint {index}: {public_url(endpoint.spec.url) or endpoint.spec.kind}]")
        print(endpoint.plan.describe())
    print(f"planned {prepared.plan.request_count} requests; nothing was run")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from kvbatch.batch.sample import write_sample

    path = write_sample(Path(args.out), args.n, seed=args.seed, max_tokens=args.max_tokens,
                        json_answer=args.json)  # fmt: skip
    print(f"wrote {args.n} requests to {path}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from kvbatch.report.measure_reports import run_measurement_notebooks

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


def cmd_report(args: argparse.Namespace) -> int:
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.report.render import newest_run, render_run_report

    folder = RunFolder.named(args.run) if args.run else RunFolder(newest_run())
    if not folder.is_run():
        raise UserInputError(f"{folder.path} is not a run folder (no run.json); run `make batch` first")
    print(f"report: {render_run_report(folder.path)}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from kvbatch.aio import run_sync
    from kvbatch.api.service import api_key_from, serve

    key = api_key_from(args.api_key_env, args.host)
    secret = os.environ.get(args.webhook_secret_env) if args.webhook_secret_env else None
    if args.webhook_secret_env and not secret:
        raise UserInputError(f"--webhook-secret-env {args.webhook_secret_env}: that environment variable is not set")
    args.input, args.run = "api-batch.jsonl", "api"  # each batch's own file and run folder replace them
    settings = settings_from_args(args)
    run_sync(serve(settings, data=Path(args.data), host=args.host, port=args.port, api_key=key,
                   webhook_url=args.webhook_url, webhook_secret=secret, report=not args.no_report))  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.report.results import EXPORT_FORMATS, export_results

    folder = RunFolder.named(args.run)
    if not folder.is_run():
        raise UserInputError(f"{folder.path} is not a run folder (no run.json)")
    out = Path(args.out)
    fmt = args.format or out.suffix.lstrip(".").lower()
    if fmt not in EXPORT_FORMATS:
        raise UserInputError(f"--out {out}: say --format ({', '.join(EXPORT_FORMATS)}); the suffix does not tell")
    rows = export_results(folder.path, out, fmt)
    print(f"{rows} rows ({fmt}): {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # A shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt; the
    # terminal only sends Ctrl-C to the foreground job anyway, so always take it as "stop cleanly".
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C).", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KvbatchError as exc:
        print(f"kvbatch {args.command}: {exc}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
