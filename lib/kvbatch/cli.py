"""The `kvbatch` command. The library raises; only this module prints, one sentence per mistake."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvbatch.errors import KvbatchError, UserInputError


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("embedded server")
    group.add_argument("--model-path", help="GGUF file (default: Gemma 3 270M Q4_K_M from the model package)")
    group.add_argument("--ctx", type=int, default=None, help="total context tokens (split across --parallel slots)")
    group.add_argument("--parallel", type=int, default=None, help="parallel slots")
    group.add_argument("--cache-type-k", default="f16")
    group.add_argument("--cache-type-v", default="f16")
    group.add_argument("--swa-full", action="store_true", help="full-size cache for sliding-window layers")
    group.add_argument("--flash-attn", default="auto", choices=("on", "off", "auto"))
    group.add_argument("--memory-cap", default=None, help="hard address-space cap on the server, e.g. 1.5GiB")
    group.add_argument("--threads", type=int, default=None)


def server_config_from_args(args: argparse.Namespace, *, context_tokens: int = 4096, parallel_slots: int = 1):
    from kvbatch.server import ServerConfig
    from kvbatch.units import parse_bytes

    return ServerConfig(
        model_path=Path(args.model_path) if args.model_path else None,
        context_tokens=args.ctx or context_tokens,
        parallel_slots=args.parallel or parallel_slots,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        swa_full=args.swa_full,
        flash_attention=args.flash_attn,
        memory_cap_bytes=parse_bytes(args.memory_cap, what="--memory-cap") if args.memory_cap else None,
        threads=args.threads,
        port=getattr(args, "port", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the embedded llama-server in the foreground until Ctrl-C."""
    from kvbatch.server import EmbeddedServer

    server = EmbeddedServer(server_config_from_args(args))
    with server:
        log = server.log()
        print(f"llama-server ready at {server.url} (pid {server.pid}, started in {server.start_time_s:.1f} s)")
        print(f"  OpenAI-compatible: {server.url}/v1/chat/completions   health: {server.url}/health")
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
    _add_server_flags(serve)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(handler=cmd_serve)

    run = commands.add_parser("run", help="run a batch (the same command again resumes it)")
    _add_batch_flags(run)
    run.add_argument("--no-report", action="store_true", help="skip rendering the HTML run report")
    run.set_defaults(handler=cmd_run)

    plan = commands.add_parser("plan", help="validate the input and print the plan, without running it")
    _add_batch_flags(plan)
    plan.set_defaults(handler=cmd_plan)

    sample = commands.add_parser("sample", help="write a synthetic candidate-screening batch of any size")
    sample.add_argument("--n", type=int, default=16)
    sample.add_argument("--out", default="data/sample/requests.jsonl")
    sample.add_argument("--max-tokens", type=int, default=300)
    sample.add_argument("--seed", type=int, default=1)
    sample.set_defaults(handler=cmd_sample)

    measure = commands.add_parser("measure", help="run the measurement notebooks headless; reports in reports/")
    measure.add_argument("--backend", default="embedded", choices=("embedded", "ollama"))
    measure.add_argument("--url", default=None, help="Ollama URL (with --backend ollama)")
    measure.add_argument("--model", default=None, help="Ollama model name (with --backend ollama)")
    measure.add_argument("--model-path", default=None, help="GGUF for the embedded server")
    measure.add_argument("--contexts", default="2048,8192,16384,32768", help="sweep A context sizes, comma-separated")
    measure.add_argument("--repeats", type=int, default=2)
    measure.add_argument(
        "--budget",
        default="+24MiB",
        help="memory budget for the safe-context search: 8GiB, or +24MiB above the model's own need",
    )
    measure.add_argument("--margin", type=float, default=0.8, help="safety margin applied to the largest context")
    measure.add_argument("--duration", type=float, default=60, help="sustained-load seconds")
    measure.add_argument(
        "--only", default="kv_growth,safe_context,sustained_load", help="which notebooks to run, comma-separated"
    )
    measure.set_defaults(handler=cmd_measure)

    report = commands.add_parser("report", help="render (again) the HTML report of a run")
    report.add_argument("--run", default=None, help="run folder or name under data/runs (default: the newest)")
    report.set_defaults(handler=cmd_report)
    return parser


def _add_batch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="OpenAI Batch JSONL, or a CSV/JSONL table with --system-prompt and --template")
    parser.add_argument("--run", default=None, help="run folder or name under data/runs (default: from the input name)")
    parser.add_argument("--system-prompt", default=None, help="system prompt file (table input)")
    parser.add_argument("--template", default=None, help="user message template with {column} fields (table input)")
    parser.add_argument("--id-column", default=None, help="table column to use as custom_id (default: row-N)")
    parser.add_argument("--mode", default="independent", choices=("independent", "conversation"))
    parser.add_argument(
        "--concurrency", default="auto", help="requests in flight, or auto (measure and keep the fastest)"
    )
    parser.add_argument("--slot-ctx", type=int, default=None, help="per-slot context (default: planned)")
    parser.add_argument("--url", default=None, help="use a running server instead of the embedded one")
    parser.add_argument("--backend", default="openai", help="openai (any /v1 server) or ollama (native API)")
    parser.add_argument("--model", default=None, help="model name on the external server")
    parser.add_argument(
        "--memory-budget", default=None, help="memory the server may use, e.g. 8GiB (default: free RAM)"
    )
    parser.add_argument("--safety-margin", type=float, default=0.8)
    parser.add_argument(
        "--measurements", default=None, help="measurement file (default: data/measurements/ for the model)"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="override max_tokens of every request")
    parser.add_argument("--temperature", type=float, default=None, help="override temperature of every request")
    parser.add_argument("--max-attempts", type=int, default=4)
    parser.add_argument(
        "--memory-threshold",
        default=None,
        help="server memory above which the run reacts (ends conversation chunks early, lowers "
        "the in-flight count), e.g. 6GiB; default: 95 %% of --memory-budget if given",
    )
    parser.add_argument("--no-progress", action="store_true")
    _add_server_flags(parser)


def _run_dir(args: argparse.Namespace) -> Path:
    from kvbatch.runner import RUNS_DIR

    if args.run is None:
        return RUNS_DIR / Path(args.input).stem
    candidate = Path(args.run)
    return candidate if candidate.is_absolute() or len(candidate.parts) > 1 else RUNS_DIR / candidate


def settings_from_args(args: argparse.Namespace):
    from kvbatch.runner import BatchSettings
    from kvbatch.units import parse_bytes

    concurrency: int | str = args.concurrency
    if concurrency != "auto":
        try:
            concurrency = int(concurrency)
        except ValueError as exc:
            raise UserInputError(f"--concurrency: {args.concurrency!r} is neither a number nor auto") from exc
    generation = {
        key: value
        for key, value in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
        if value is not None
    }
    return BatchSettings(
        input_path=Path(args.input),
        run_dir=_run_dir(args),
        system_prompt_path=Path(args.system_prompt) if args.system_prompt else None,
        template=args.template,
        id_column=args.id_column,
        mode=args.mode,
        concurrency=concurrency,
        max_slots=args.parallel or (concurrency if isinstance(concurrency, int) else None),
        slot_context_tokens=args.slot_ctx,
        url=args.url,
        backend=args.backend,
        model=args.model,
        server=server_config_from_args(args),
        memory_budget_bytes=parse_bytes(args.memory_budget, what="--memory-budget") if args.memory_budget else None,
        safety_margin=args.safety_margin,
        measurement_path=Path(args.measurements) if args.measurements else None,
        generation=generation,
        max_attempts=args.max_attempts,
        progress=not args.no_progress,
        memory_threshold_bytes=_memory_threshold(args),
    )


def _memory_threshold(args: argparse.Namespace) -> int | None:
    from kvbatch.units import parse_bytes

    if args.memory_threshold:
        return parse_bytes(args.memory_threshold, what="--memory-threshold")
    if args.memory_budget:
        return int(parse_bytes(args.memory_budget, what="--memory-budget") * 0.95)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from kvbatch.runner import run_batch

    settings = settings_from_args(args)
    outcome = run_batch(settings)
    print(outcome.message)
    if outcome.plan is None and not outcome.summary:
        return 0
    if not args.no_report:
        from kvbatch.report import render_run_report

        html = render_run_report(outcome.run_dir)
        print(f"report: {html}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kvbatch.runner import plan_only

    print(plan_only(settings_from_args(args)))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from kvbatch.sample import write_sample

    path = write_sample(Path(args.out), args.n, seed=args.seed, max_tokens=args.max_tokens)
    print(f"wrote {args.n} requests to {path}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    """Execute the measurement notebooks with papermill, one after another, and render their HTML reports."""
    import json
    import time

    from kvbatch.measurements import model_name
    from kvbatch.plan import result_path
    from kvbatch.report import NOTEBOOKS_DIR, render_notebook
    from kvbatch.server import ServerConfig
    from kvbatch.units import parse_bytes

    if args.backend == "ollama" and not (args.url and args.model):
        raise UserInputError("--backend ollama needs --url and --model")
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError as exc:
        raise UserInputError(f"--contexts: {args.contexts!r} is not a comma-separated list of numbers") from exc
    parse_bytes(args.budget.lstrip("+"), what="--budget")
    common = {"backend": args.backend, "url": args.url, "model": args.model, "model_path": args.model_path}
    name = model_name(args.backend, args.model, args.model_path)
    steps = {
        "kv_growth": {**common, "contexts": contexts, "repeats": args.repeats},
        "safe_context": {**common, "budget": args.budget, "safety_margin": args.margin},
        "sustained_load": {
            **common,
            "backend": "ollama" if args.backend == "ollama" else "embedded",
            "duration_s": args.duration,
        },
    }
    chosen = [step.strip() for step in args.only.split(",") if step.strip()]
    unknown = [step for step in chosen if step not in steps]
    if unknown:
        raise UserInputError(f"--only: unknown notebook(s) {', '.join(unknown)}; known: {', '.join(steps)}")
    out = result_path(name, ServerConfig())
    for step in chosen:
        started = time.perf_counter()
        print(f"running notebooks/{step}.ipynb ...", flush=True)
        html = render_notebook(
            NOTEBOOKS_DIR / f"{step}.ipynb",
            steps[step],
            f"{step}-{Path(name).stem}",
            title=f"{step.replace('_', ' ')}: {name}",
            headline=lambda step=step: _headline(step, out),
        )
        print(f"  {html} ({time.perf_counter() - started:.0f} s)", flush=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    fit = result.get("fit", {})
    if fit:
        print(
            f"slope {fit['slope_bytes_per_token'] / 1024:.2f} KiB/token (predicted "
            f"{fit['predicted_slope_bytes_per_token'] / 1024:.2f}); safe context {result.get('safe_context_tokens')}"
            f" tokens; results: {out}"
        )
    print("reports: reports/index.html")
    return 0


def _headline(step: str, out: Path) -> dict[str, object]:
    import json

    if not out.exists():
        return {}
    data = json.loads(out.read_text())
    if step == "kv_growth" and "fit" in data:
        fit = data["fit"]
        return {
            "KiB/token": round(fit["slope_bytes_per_token"] / 1024, 3),
            "predicted": round(fit["predicted_slope_bytes_per_token"] / 1024, 3),
        }
    if step == "safe_context" and "safe_context" in data:
        safe = data["safe_context"]
        return {
            "safe context": safe["safe_context_tokens"],
            "largest": safe["max_context_tokens"],
            "loads": safe["loads"],
        }
    if step == "sustained_load" and "sustained" in data:
        return {"passed": data["sustained"]["passed"], "requests": data["sustained"]["requests"]}
    return {}


def cmd_report(args: argparse.Namespace) -> int:
    from kvbatch.report import newest_run, render_run_report

    run_dir = (
        Path(args.run)
        if args.run and Path(args.run).exists()
        else (Path("data/runs") / args.run if args.run else newest_run())
    )
    if not (run_dir / "run.json").exists():
        raise UserInputError(f"{run_dir} is not a run folder (no run.json); run `make batch` first")
    print(f"report: {render_run_report(run_dir)}")
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
        resume = " Every finished request is saved; run the same command to resume." if args.command == "run" else ""
        print(f"stopped (Ctrl-C).{resume}", file=sys.stderr)
        return 130
    except KvbatchError as exc:
        print(f"kvbatch {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
