"""Executor benchmarks, printed side by side in one run (ratios, not absolute times: these machines are noisy).

  1. kvbatch vs a bare client loop at the same concurrency, on the embedded server   (goal >= 0.95)
  2. independent vs conversation mode on the same requests        (original: conversation 1.39x slower)
  3. share of system-prompt tokens served from the prefix cache                       (goal >= 98.8 %)
  4. executor vs a bare aiohttp loop against an instant local server, 64 in flight    (goal >= 0.8)
  5. the 170,000-request input against the fault-injecting server, killed with kill -9 three times and resumed:
     exactly once, the executor's peak memory (goal < 200 MB), resume time (goal < 5 s) (bench/stress.py)
  6. `kvbatch run` with no concurrency flag on a server that runs 64 requests at once at the same latency and does
     not say so (vLLM's continuous batching), against a bare aiohttp loop at 64 in flight     (goal >= 0.8)

Usage: .venv/bin/python bench/bench_executor.py [--parts 1,2,3,4,5,6] [--big-n 170000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from kvbatch.batch.inputs.openai_batch import iter_openai_batch, scan_openai_batch
from kvbatch.batch.inputs.sample import write_sample
from kvbatch.batch.run.execution.executor import Executor, RunOptions
from kvbatch.batch.run.journal import Fingerprint, Journal
from kvbatch.batch.runfolder import RunFolder
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.server import EmbeddedServer, free_port
from kvbatch.serve.supervisor import ExternalSupervisor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
rows: list[tuple[str, str, str, str]] = []


def row(what: str, kvbatch: str, baseline: str, ratio: str) -> None:
    rows.append((what, kvbatch, baseline, ratio))
    print(f"  {what}: {kvbatch} | {baseline} | {ratio}", flush=True)


def make_batch(path: Path, n: int, *, system_tokens: int, user_tokens: int, max_tokens: int) -> Path:
    return write_sample(path, n, max_tokens=max_tokens, system_tokens=system_tokens, user_tokens=user_tokens)


async def bare_loop(url: str, bodies: list[dict], in_flight: int, key: str | None = None) -> float:
    """The simplest client a user would write: a semaphore, one aiohttp session, post and read."""
    limit = asyncio.Semaphore(in_flight)
    connector = aiohttp.TCPConnector(limit=in_flight)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(body: dict) -> None:
            async with limit, session.post(url + "/v1/chat/completions", json=body) as reply:
                await reply.json()

        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - started


async def kvbatch_run(
    url: str,
    batch: Path,
    in_flight: int,
    *,
    mode: str = "independent",
    chunk_size: int = 1,
    slot_context: int = 8192,
    pinning: bool = True,
    key: str | None = None,
) -> tuple[float, Executor]:
    """kvbatch's executor on an already-running server (server start and planning excluded, as for the bare loop)."""
    report = scan_openai_batch(batch)
    folder = RunFolder(Path(tempfile.mkdtemp(prefix="kvbatch-bench-")))
    fingerprint = Fingerprint(input_hash=report.input_hash, model="bench", system_prompt_hash="", generation={},
                              mode=mode)  # fmt: skip
    journal = Journal.open(folder, fingerprint)
    backend = get_backend("openai", url, slot_pinning=pinning, options=BackendOptions(api_key=key))
    supervisor = ExternalSupervisor(backend, SlotLayout(in_flight, slot_context))
    tokens = await backend.tokenize(next(iter(report.prefix_texts.values())))
    prefix_tokens = {k: len(tokens) if tokens else 0 for k in report.prefix_texts}
    options = RunOptions(mode=mode, concurrency=in_flight, chunk_size=chunk_size, progress=False)
    executor = Executor(journal, [supervisor], options, folder=folder, prefix_tokens=prefix_tokens,
                        total=report.request_count)  # fmt: skip
    started = time.perf_counter()
    await executor.run(iter_openai_batch(report))
    seconds = time.perf_counter() - started
    journal.close()
    await backend.aclose()
    return seconds, executor


def bodies_of(batch: Path) -> list[dict]:
    return [json.loads(line)["body"] for line in batch.read_text().splitlines()]


def part_1_2_3(work: Path, n: int) -> None:
    batch = make_batch(work / "real.jsonl", n, system_tokens=2400, user_tokens=150, max_tokens=16)
    config = ServerConfig(context_tokens=8192, parallel_slots=1)
    with EmbeddedServer(config) as server:
        key = server.api_key
        # warm the slot once so that neither arm pays the cold system prompt first
        asyncio.run(bare_loop(server.url, bodies_of(batch)[:1], 1, key))
        bare_s = asyncio.run(bare_loop(server.url, bodies_of(batch), 1, key))
        kv_s, executor = asyncio.run(kvbatch_run(server.url, batch, 1, key=key))
        bare_again_s = asyncio.run(bare_loop(server.url, bodies_of(batch), 1, key))
    bare_best = min(bare_s, bare_again_s)
    row(
        f"1. throughput on the embedded server, {n} requests, 1 in flight (req/s)",
        f"{n / kv_s:.3f}",
        f"bare loop {n / bare_best:.3f}",
        f"{bare_best / kv_s:.3f} (goal >= 0.95)",
    )

    with EmbeddedServer(config) as server:
        asyncio.run(bare_loop(server.url, bodies_of(batch)[:1], 1, server.api_key))
        independent_s, _ = asyncio.run(kvbatch_run(server.url, batch, 1, key=server.api_key))
    turn = 150 + 16 + 16
    chunk = max(1, (8192 - 2400) // turn)
    with EmbeddedServer(config) as server:
        conversation_s, _ = asyncio.run(
            kvbatch_run(
                server.url, batch, 1, mode="conversation", chunk_size=chunk, slot_context=8192, key=server.api_key
            )
        )
    row(
        f"2. independent vs conversation (chunk {chunk}), same {n} requests (s)",
        f"independent {independent_s:.1f}",
        f"conversation {conversation_s:.1f}",
        f"conversation {conversation_s / independent_s:.2f}x slower (original method: 1.39x at chunk 86)",
    )

    small = make_batch(work / "share.jsonl", 100, system_tokens=2400, user_tokens=20, max_tokens=1)
    with EmbeddedServer(config) as server:
        _, executor = asyncio.run(kvbatch_run(server.url, small, 1, key=server.api_key))
    prefixes = executor.stats.per_prefix.values()
    served = sum(p.prefix_cached_tokens for p in prefixes)
    system = sum(p.prefix_tokens for p in prefixes)
    row(
        "3. system-prompt tokens served from the prefix cache, 100 requests, cold start included",
        f"{executor.stats.system_prompt_share():.2%}",
        f"{served:,} of {system:,} system-prompt tokens",
        "goal >= 98.8 %",
    )


def start_instant_server(*flags: str) -> tuple[subprocess.Popen, str]:
    return start_instant_server_on(free_port(), *flags)


def start_instant_server_on(port: int, *flags: str) -> tuple[subprocess.Popen, str]:
    """The fault server on `port` (again on the same one, after it was killed: an upstream outage)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fault_server.py"), str(port), *flags], stdout=subprocess.DEVNULL
    )  # no faults: an instant server (or what the flags make it), in its own process
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            import urllib.request

            urllib.request.urlopen(url + "/health", timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("instant server did not start")


def part_4(work: Path, n: int, in_flight: int = 64, rounds: int = 5) -> None:
    """Rounds of bare loop then executor, back to back: this VM's speed drifts by 1.5x within a minute, so each
    round's ratio compares neighbours, and the median round is the figure."""
    batch = make_batch(work / "instant.jsonl", n, system_tokens=2400, user_tokens=150, max_tokens=16)
    process, url = start_instant_server()
    pairs = []
    try:
        for _ in range(rounds):
            bare_s = asyncio.run(bare_loop(url, bodies_of(batch), in_flight))
            kv_s, _ = asyncio.run(kvbatch_run(url, batch, in_flight, pinning=False))
            pairs.append((bare_s, kv_s))
    finally:
        process.terminate()
    pairs.sort(key=lambda pair: pair[0] / pair[1])
    bare_s, kv_s = pairs[len(pairs) // 2]
    row(
        f"4. executor vs bare aiohttp loop, instant server, {n} requests, {in_flight} in flight (req/s, median of "
        f"{rounds} rounds)",
        f"{n / kv_s:,.0f}",
        f"bare loop {n / bare_s:,.0f}",
        f"{bare_s / kv_s:.2f} (goal >= 0.8; rounds {', '.join(f'{b / k:.2f}' for b, k in pairs)})",
    )


def part_6(work: Path, n: int, in_flight: int = 64, latency_s: float = 0.2) -> None:
    """The run's own rate (summary.json, after planning) against the bare loop's, on the same server."""
    batch = make_batch(work / "batching.jsonl", n, system_tokens=300, user_tokens=40, max_tokens=8)
    process, url = start_instant_server("--vllm", "--slots", str(in_flight), "--service-s", str(latency_s))
    try:
        bare_s = asyncio.run(bare_loop(url, bodies_of(batch), in_flight))
        command = [sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--url", url, "--no-report",
                   "--no-progress", "--run", "batching"]  # fmt: skip
        run = subprocess.run(command, cwd=work, capture_output=True, text=True)
    finally:
        process.terminate()
    if run.returncode != 0:
        raise RuntimeError(run.stdout + run.stderr)
    summary = json.loads((work / "data" / "runs" / "batching" / "summary.json").read_text())
    chosen = [t["in_flight"] for t in summary["concurrency_trials"]]
    rate, bare_rate = summary["requests_per_s"], n / bare_s
    row(
        f"6. no --concurrency on a server running {in_flight} at once ({latency_s} s each), {n} requests (req/s)",
        f"{rate:,.1f} (tried {', '.join(map(str, chosen))})",
        f"bare loop at {in_flight}: {bare_rate:,.1f}",
        f"{rate / bare_rate:.2f} (goal >= 0.8)",
    )


def part_5(work: Path, n: int) -> None:
    from fault_server import Faults
    from stress import ORIGINAL_SHAPE, stress_run

    outcome = stress_run(n, 3, work, faults=Faults(seed=7), poison=False, shape=ORIGINAL_SHAPE)
    size = (work / "stress.jsonl").stat().st_size
    row(
        f"5a. executor peak memory (VmHWM), {n:,}-request input ({size / 2**30:.1f} GiB), faults, 3 kills and resumes",
        f"{outcome.peak_rss_bytes / 2**20:.0f} MiB",
        f"{outcome.results:,} results, {outcome.duplicates} duplicated, {outcome.lost} lost, {outcome.wall_s:.0f} s",
        "goal < 200 MB",
    )
    row(
        "5b. resume after kill -9, until the first new request (saved input index, journal re-read)",
        ", ".join(f"{s:.2f} s" for s in outcome.resume_s),
        "3 resumes",
        "goal < 5 s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="1,2,3,4,5,6")
    parser.add_argument("--batching-n", type=int, default=3000, help="requests for part 6")
    parser.add_argument("--n", type=int, default=24, help="requests for parts 1-2 (real server)")
    parser.add_argument("--instant-n", type=int, default=20000)
    parser.add_argument("--big-n", type=int, default=170000)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="kvbatch-bench-") as scratch:
        work = Path(scratch)
        if parts & {"1", "2", "3"}:
            part_1_2_3(work, args.n)
        if "4" in parts:
            part_4(work, args.instant_n)
        if "5" in parts:
            part_5(work, args.big_n)
        if "6" in parts:
            part_6(work, args.batching_n)
    print("\n| benchmark | kvbatch | baseline | ratio / goal |\n|---|---|---|---|")
    for what, kvbatch, baseline, ratio in rows:
        print(f"| {what} | {kvbatch} | {baseline} | {ratio} |")
    print(f"\n(bench process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
