"""The GPU check, for a machine with an NVIDIA GPU: the CUDA build, sweep A by NVML, the safe-context search against
the card's real memory, a sustained load at the plan, and a 10,000-request run of the sample's shape, on a
Gemma-3-12B-shaped GGUF with random weights (the 270M is too small to meet an H200's limit). One table.

The file has the 12B's attention (8 KV heads of 256, a 1,024-token window, one global layer in six) and width
(3,840; feed-forward 15,360) with `--layers` layers (default 12: 2 global): the prediction scales with them.

Usage: .venv/bin/python bench/gpu_check.py [--layers 12] [--requests 10000] [--sustain-s 60]
Fails at once, with a sentence, on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvbatch.serve.probes import gpu_memory, nvml_available

ROOT = Path(__file__).resolve().parents[1]
rows: list[tuple[str, str]] = []


def row(what: str, value: str) -> None:
    rows.append((what, value))
    print(f"  {what}: {value}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--sustain-s", type=float, default=60.0)
    parser.add_argument("--contexts", default="16384,65536,131072,262144")
    args = parser.parse_args()
    if not nvml_available():
        print("gpu_check needs an NVIDIA GPU: no driver answers here (nvidia-smi / NVML). Run it on a GPU machine; "
              "the CPU figures come from `make measure` and bench/bench_executor.py.", file=sys.stderr)  # fmt: skip
        return 2
    started = time.perf_counter()
    card = gpu_memory()[0]
    row("card", f"{card.name}, {card.total_bytes / 2**30:.1f} GiB, {card.others_bytes / 2**30:.2f} GiB held by others")

    from kvbatch.serve.build import BuildError, installed_build, setup_server

    build = installed_build()
    if build is None or build.backend != "cuda":
        began = time.perf_counter()
        try:
            build = setup_server(backend="cuda", say=lambda line: print(f"  {line}", flush=True))
        except BuildError as exc:
            print(f"gpu_check: the CUDA build failed: {exc}", file=sys.stderr)
            return 2
        row("CUDA build", f"{build.describe()} in {time.perf_counter() - began:.0f} s")
    else:
        row("CUDA build", f"{build.describe()} (installed)")

    from kvbatch.measure.synthetic import gemma3_12b_like, write_gemma3_gguf

    shape = gemma3_12b_like(args.layers)
    model = Path(tempfile.gettempdir()) / f"kvbatch-gemma3-12b-shaped-{args.layers}L.gguf"
    if not model.exists():
        began = time.perf_counter()
        write_gemma3_gguf(model, shape)
        row(
            "model",
            f"{model.name}: {model.stat().st_size / 2**30:.1f} GiB written in {time.perf_counter() - began:.0f} s",
        )
    arch = shape.architecture

    from kvbatch.measure.budget import gpu_budget
    from kvbatch.measure.experiments import fit_line, max_loads, search_safe_context, sweep_allocated
    from kvbatch.measure.kvmodel import KvCacheTypes, kv_bytes_per_token
    from kvbatch.measure.loaders import EmbeddedLoader
    from kvbatch.serve.config import ServerConfig

    config = ServerConfig(model_path=model)
    loader = EmbeddedLoader(config, probe="nvml-process")
    contexts = [int(c) for c in args.contexts.split(",")]
    try:
        points = sweep_allocated(loader, contexts, repeats=1)
        fit = fit_line([p.context_tokens for p in points], [p.used_bytes for p in points])
        predicted = kv_bytes_per_token(arch, KvCacheTypes())
        row(
            "sweep A (NVML, per process)",
            f"{fit.slope_bytes_per_token / 1024:.1f} KiB/token, predicted "
            f"{predicted / 1024:.1f} ({fit.slope_bytes_per_token / predicted - 1:+.1%}), R² {fit.r_squared:.5f}",
        )
        budget = gpu_budget()
        assert budget is not None
        search = search_safe_context(
            loader,
            budget.bytes,
            floor_tokens=16384,
            ceiling_tokens=4_194_304,
            step_tokens=8192,
            guide=fit,
            fill_fraction=0.05,
            enforce_budget=False,
        )
        row(
            "safe-context search (the card)",
            f"budget {budget.text}: largest {search.max_context_tokens} tokens, "
            f"safe {search.safe_context_tokens}, {search.loads} loads (bound {max_loads(16384, 4_194_304, 8192)})",
        )
    finally:
        loader.close()

    from kvbatch.batch.inputs.sample import write_sample

    work = Path(tempfile.mkdtemp(prefix="kvbatch-gpu-"))
    batch = write_sample(work / "batch.jsonl", args.requests, max_tokens=16)
    plan = subprocess.run([sys.executable, "-m", "kvbatch.cli", "plan", str(batch), "--json", "--model-path",
                           str(model)], cwd=work, capture_output=True, text=True)  # fmt: skip
    if plan.returncode != 0:
        print(plan.stderr, file=sys.stderr)
        return 1
    planned = json.loads(plan.stdout)
    row(
        "plan",
        f"{planned['parallel_slots']} slot(s) x {planned['slot_context_tokens']} tokens, KV cache "
        f"{planned['kv_cache_bytes'] / 2**30:.2f} GiB, memory {planned['memory']['total_bytes'] / 2**30:.2f} GiB of "
        f"{planned['budget_bytes'] / 2**30:.2f} GiB",
    )
    row("sustained load at the plan", _sustain(model, planned, batch, args.sustain_s))

    began = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--model-path", str(model),
                          "--no-report", "--no-progress", "--concurrency", str(planned["parallel_slots"])],
                         cwd=work, capture_output=True, text=True)  # fmt: skip
    if run.returncode != 0:
        print(run.stdout[-2000:], run.stderr[-2000:], file=sys.stderr)
        return 1
    summary = json.loads((work / "data" / "runs" / "batch" / "summary.json").read_text())
    ids = [json.loads(line)["custom_id"] for line in (work / "data/runs/batch/results.jsonl").read_text().splitlines()]
    row(
        f"{args.requests:,}-request run (sample shape, 16-token answers)",
        f"{summary['completed_total']:,} done, {summary['failed_total']} failed, {len(ids) - len(set(ids))} "
        f"duplicated, {summary['requests_per_s']:.1f} req/s, system prompt from cache "
        f"{summary['system_prompt_share_served_from_cache']:.1%}, {time.perf_counter() - began:.0f} s",
    )
    row("whole check", f"{time.perf_counter() - started:.0f} s")
    width = max(len(what) for what, _ in rows)
    print("\n" + "\n".join(f"| {what:<{width}} | {value} |" for what, value in rows))
    return 0


def _sustain(model: Path, planned: dict, batch: Path, duration_s: float) -> str:
    from kvbatch.measure.sustained import sustained_load
    from kvbatch.serve.backends import BackendOptions, get_backend
    from kvbatch.serve.config import ServerConfig
    from kvbatch.serve.probes import probe_for_server
    from kvbatch.serve.server import EmbeddedServer

    bodies = [json.loads(line)["body"] for line in itertools.islice(batch.open(), 4 * planned["parallel_slots"])]
    config = ServerConfig(model_path=model, context_tokens=planned["total_context_tokens"],
                          parallel_slots=planned["parallel_slots"])  # fmt: skip
    with EmbeddedServer(config) as server:

        async def go():
            async with get_backend("openai", server.url, slot_pinning=True,
                                   options=BackendOptions(api_key=server.api_key)) as backend:
                return await sustained_load(backend, probe_for_server(server.pid, server.log_text), bodies,
                                            slots=planned["parallel_slots"], duration_s=duration_s,
                                            slot_context_tokens=planned["total_context_tokens"]
                                            // planned["parallel_slots"],
                                            budget_bytes=planned["budget_bytes"])  # fmt: skip

        outcome = asyncio.run(go())
    verdict = "PASSED" if outcome.passed else "FAILED: " + "; ".join(outcome.reasons)
    peak = (outcome.memory_peak_bytes or 0) / 2**30
    drift = (outcome.memory_drift_bytes or 0) / 2**20
    return f"{verdict}; {outcome.requests} requests in {outcome.duration_s:.0f} s, peak {peak:.2f} GiB, drift {drift:+.0f} MiB"  # noqa: E501


if __name__ == "__main__":
    sys.exit(main())
