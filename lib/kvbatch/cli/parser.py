"""The `kvbatch` command line: every command, its flags and its help, built without importing what the commands
run (so `kvbatch --help` is quick). Each command names its handler as "module:function" in `kvbatch.cli`."""

from __future__ import annotations

import argparse

from kvbatch import defaults
from kvbatch.errors import EXIT_CODES_HELP

DESCRIPTION = "The `kvbatch` command. The library raises; only the command prints, one sentence per mistake."
KV_TYPE_CHOICES = ("f16", "q8_0", "q4_0", "bf16", "f32", "auto")


def add_server_flags(parser: argparse.ArgumentParser, *, with_context: bool) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbatch", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the embedded llama-server and print its URL")
    add_server_flags(serve, with_context=True)
    serve.set_defaults(handler="serve:cmd_serve")

    run = commands.add_parser("run", help="run a batch (the same command again resumes it)", epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_batch_flags(run)
    run.add_argument("--no-report", action="store_true", help="skip rendering the HTML run report")
    run.add_argument("--retry-failed", action="store_true", help="send the requests in errors.jsonl again")
    run.set_defaults(handler="batch:cmd_run")

    plan = commands.add_parser("plan", help="validate the input and print the plan, without running it")
    add_batch_flags(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (plan.json's model)")
    plan.set_defaults(handler="batch:cmd_plan")

    sample = commands.add_parser("sample", help="write a synthetic candidate-screening batch of any size")
    sample.add_argument("--n", type=int, default=16)
    sample.add_argument("--out", default=str(defaults.SAMPLE_INPUT))
    sample.add_argument("--max-tokens", type=int, default=300)
    sample.add_argument("--seed", type=int, default=1)
    answers = sample.add_mutually_exclusive_group()
    answers.add_argument("--json", dest="json", action="store_true", default=True,
                         help="each request asks for a JSON decision with a schema (response_format; the default, "
                              "as the shipped sample)")
    answers.add_argument("--text", dest="json", action="store_false",
                         help="each request asks for a free-text screening (no response_format)")
    sample.set_defaults(handler="batch:cmd_sample")

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
    measure.set_defaults(handler="measure:cmd_measure")

    report = commands.add_parser("report", help="render (again) the HTML report of a run")
    report.add_argument("--run", default=None, help="run folder or name under data/runs (default: the newest)")
    report.set_defaults(handler="batch:cmd_report")

    api = commands.add_parser("api", help="serve the OpenAI Batch API on this machine (files, batches, a status page)")
    add_batch_flags(api, with_input=False)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=defaults.API_PORT)
    api.add_argument("--data", default=str(defaults.API_DATA_DIR), help="store folder (SQLite, files, run folders)")
    api.add_argument("--api-key-env", default=None,
                     help="environment variable holding the key clients must send (needed beyond loopback)")
    api.add_argument("--webhook-url", default=None, help="POST batch.completed/failed/cancelled events here")
    api.add_argument("--batch-webhook-prefix", action="append", default=[],
                     help="let a batch's metadata.webhook_url name a receiver starting with this (repeat for "
                          "several); by default only --webhook-url is called")  # fmt: skip
    api.add_argument("--webhook-secret-env", default=None,
                     help="environment variable holding the webhook signing secret (Standard Webhooks)")
    api.add_argument("--webhook-give-up-hours", type=float, default=defaults.WEBHOOK_GIVE_UP_S / 3600,
                     help="retry an undelivered webhook event with back-off until it is this old (default 72, as "
                          "OpenAI)")  # fmt: skip
    api.add_argument("--no-report", action="store_true", help="skip rendering each batch's HTML report")
    api.set_defaults(handler="api:cmd_api")

    webhooks = commands.add_parser("webhooks", help="list kvbatch api's webhook outbox: pending, delivered, given up")
    webhooks.add_argument("--data", default=str(defaults.API_DATA_DIR), help="the store folder kvbatch api uses")
    webhooks.add_argument("--limit", type=int, default=50, help="how many of the newest deliveries to list")
    webhooks.set_defaults(handler="api:cmd_webhooks")

    export = commands.add_parser("export", help="write a run's answers as one table (a row per custom_id)")
    export.add_argument("run", help="run folder or name under data/runs")
    export.add_argument("--format", default=None, choices=("csv", "parquet", "jsonl"),
                        help="default: from the --out file's suffix")  # fmt: skip
    export.add_argument("--out", required=True, help="file to write")
    export.set_defaults(handler="batch:cmd_export")
    return parser


def add_batch_flags(parser: argparse.ArgumentParser, *, with_input: bool = True) -> None:
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
    parser.add_argument("--memory-sample-s", type=float, default=defaults.MEMORY_SAMPLE_S,
                        help="how often the server's memory is sampled (memory.csv, the reactions above)")  # fmt: skip
    parser.add_argument("--restart-above", default=None,
                        help="drain and restart the embedded server when its memory passes this, e.g. 900MiB (its "
                             "requests in flight finish first; nothing is lost or charged); default: the plan's peak "
                             "+ 10 %% (at least 64 MiB)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    add_server_flags(parser, with_context=False)
