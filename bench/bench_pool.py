"""Pool benchmark, printed as one table (ratios, not absolute times: these machines are noisy).

Servers with a fixed service time per request and one slot each (bench/fault_server.py, no faults):
  1. one endpoint against four                                   (goal: at least 3.6x; the limit is 4x)
  2. the same four through Ray actors, against one actor         (goal: at least 3.2x)
  3. four endpoints, one of which dies mid-batch and comes back  (no request lost or duplicated; time lost)

Usage: .venv/bin/python bench/bench_pool.py [--n 400] [--service-s 0.05] [--no-ray]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_server import Faults, RunningFaultServer  # noqa: E402
from kvbatch.batch.inputs.sample import write_sample  # noqa: E402
from kvbatch.serve.server import free_port  # noqa: E402


def _run(batch: Path, workdir: Path, args: list[str], *, during=None) -> dict:
    command = [sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--run", str(workdir / "run"), "--no-report",
               "--no-progress", *args]  # fmt: skip
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if during is not None:
        during(workdir / "run")
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(out[-2000:])
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    ids = [json.loads(line)["custom_id"] for line in (workdir / "run" / "results.jsonl").read_text().splitlines()]
    summary["duplicates"] = sum(n - 1 for n in collections.Counter(ids).values() if n > 1)
    summary["results"] = len(ids)
    summary["events"] = [json.loads(line) for line in (workdir / "run" / "events.jsonl").read_text().splitlines()] \
        if (workdir / "run" / "events.jsonl").exists() else []  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--service-s", type=float, default=0.05)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    faults = Faults(service_s=args.service_s, slots=1, down_s=3.0)
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="kvbatch-pool-") as scratch:
        root = Path(scratch)
        batch = write_sample(root / "in.jsonl", args.n, max_tokens=8, system_tokens=300, user_tokens=40)
        servers = [RunningFaultServer(free_port(), faults) for _ in range(4)]
        for server in servers:
            server.__enter__()
        try:
            urls = [server.url for server in servers]

            def case(name: str, extra: list[str], during=None) -> dict:
                workdir = root / name
                workdir.mkdir()
                return _run(batch, workdir, extra, during=during)

            one = case("one", ["--url", urls[0]])
            four = case("four", [arg for url in urls for arg in ("--url", url)])
            ratio = four["requests_per_s"] / one["requests_per_s"]
            rows.append(
                (
                    "1. four endpoints vs one",
                    f"{four['requests_per_s']:.1f} req/s",
                    f"{one['requests_per_s']:.1f} req/s",
                    f"{ratio:.2f}x (goal >= 3.6x, limit 4x)",
                )
            )

            def kill_one(run_dir: Path) -> None:
                results = run_dir / "results.jsonl"
                while not results.exists() or results.read_text().count("\n") < args.n // 4:
                    time.sleep(0.02)
                threading.Thread(target=servers[1].crash, daemon=True).start()

            dying = case("dying", [arg for url in urls for arg in ("--url", url)], during=kill_one)
            outs = [e for e in dying["events"] if e["event"] == "endpoint_out"]
            lost = args.n - dying["results"] - dying["failed_total"]
            rows.append(
                (
                    "3. one of four dies mid-batch (down 3 s)",
                    f"{dying['results']} results, {dying['duplicates']} duplicated, {lost} lost",
                    f"{dying['requests_per_s']:.1f} req/s vs {four['requests_per_s']:.1f} without",
                    f"taken out {len(outs)}x; time lost {dying['elapsed_s'] - four['elapsed_s']:+.1f} s",
                )
            )
            if not args.no_ray:
                ray_rows = _ray_case(batch, root, urls, faults)
                rows[1:1] = ray_rows
        finally:
            for server in servers:
                server.__exit__(None, None, None)
    width = [max(len(r[i]) for r in rows + [("benchmark", "kvbatch", "baseline", "ratio / goal")]) for i in range(4)]
    print()
    for row in [("benchmark", "kvbatch", "baseline", "ratio / goal")] + rows:
        print("| " + " | ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) + " |")


def _ray_case(batch: Path, root: Path, urls: list[str], faults: Faults) -> list[tuple[str, str, str, str]]:
    """Four actors, each serving through one of the servers, against one actor: the driver's pool over Ray."""
    import asyncio

    from kvbatch.batch.inputs.openai_batch import iter_openai_batch, scan_openai_batch
    from kvbatch.batch.inputs.sizes import size_profile
    from kvbatch.batch.run.execution.executor import Executor, RunOptions
    from kvbatch.batch.run.journal import Fingerprint, Journal
    from kvbatch.batch.run.ray_pool import ActorSpec, connect, start_actors
    from kvbatch.batch.runfolder import RunFolder
    from kvbatch.batch.settings import BatchSettings

    connect("local")
    report = scan_openai_batch(batch)
    sizes = size_profile(report, 300, 4.0, "estimate")
    rates = []
    for count in (1, 4):
        folder = RunFolder(root / f"ray-{count}")
        settings = BatchSettings(input_path=batch, folder=folder)
        specs = [ActorSpec(settings, sizes, upstream_url=url, upstream_slots=1) for url in urls[:count]]
        supervisors = start_actors(specs, on_gpu=False, label=f"ray{count}", cpus=0.25)

        async def go(supervisors=supervisors, folder=folder) -> float:
            for supervisor in supervisors:
                await supervisor.start()
            journal = Journal.open(
                folder,
                Fingerprint(
                    input_hash=report.input_hash,
                    model="bench",
                    system_prompt_hash="",
                    generation={},
                    mode="independent",
                ),
            )
            executor = Executor(journal, supervisors, RunOptions(progress=False), folder=folder,
                                total=report.request_count)  # fmt: skip
            started = time.perf_counter()
            stats = await executor.run(iter_openai_batch(report))
            journal.close()
            for supervisor in supervisors:
                await supervisor.close()
            return stats.completed / (time.perf_counter() - started)

        rates.append(asyncio.run(go()))
    return [
        (
            "2. four Ray actors vs one",
            f"{rates[1]:.1f} req/s",
            f"{rates[0]:.1f} req/s",
            f"{rates[1] / rates[0]:.2f}x (goal >= 3.2x)",
        )
    ]


if __name__ == "__main__":
    main()
