"""The stress test: a batch against the fault-injecting server (503s, dropped connections, replies that are not
JSON, slow replies, crashes, one poison request), with `kvbatch run` killed with kill -9 several times and
resumed. Every custom_id must land exactly once in results.jsonl, and only the poison request in errors.jsonl.

Usage: .venv/bin/python bench/stress.py [--n 10000] [--kills 3] [--big-n 170000]
  prints one table: requests, faults injected, retries, results, duplicates, lost, wall time, time lost to faults;
  with --big-n, the same faults, kills and resumes on a large input of the original shape, with the executor's peak
  memory (VmHWM of the kvbatch process, polled: a fork's inherited high-water mark does not count) and resume time.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_server import POISON, Faults, RunningFaultServer  # noqa: E402
from kvbatch.batch.inputs.sample import write_sample  # noqa: E402
from kvbatch.serve.server import free_port  # noqa: E402

STRESS_FAULTS = Faults(p503=0.03, p_drop=0.01, p_not_json=0.01, p_slow=0.002, p_crash=0.0005, slow_s=0.5,
                       down_s=0.3, seed=7)  # fmt: skip


@dataclass
class StressOutcome:
    requests: int
    kills: int
    faults: dict[str, int]
    retries: int
    results: int
    duplicates: int
    lost: int
    failed_ids: list[str]
    poison_id: str
    wall_s: float
    waited_s: float
    peak_rss_bytes: int = 0
    resume_s: list[float] = field(default_factory=list)

    def table(self) -> str:
        injected = sum(v for k, v in self.faults.items() if k not in ("requests", "answered"))
        rows = [
            ("requests", f"{self.requests:,}"),
            ("kill -9 of kvbatch, then resume", str(self.kills)),
            ("faults injected", f"{injected:,} ("
             + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()) if k not in ("requests", "answered"))
             + ")"),
            ("requests the server saw", f"{self.faults.get('requests', 0):,}"),
            ("retries (last invocation)", f"{self.retries:,}"),
            ("results", f"{self.results:,}"),
            ("duplicates", str(self.duplicates)),
            ("lost", str(self.lost)),
            ("in errors.jsonl", ", ".join(self.failed_ids) + (" (the poison)" if self.failed_ids == [self.poison_id]
                                                             else "")),
            ("wall time, all invocations", f"{self.wall_s:.1f} s"),
            ("time requests waited out faults (last invocation)", f"{self.waited_s:.1f} s"),
        ]  # fmt: skip
        if self.peak_rss_bytes:
            rows.append(("peak memory of kvbatch (VmHWM)", f"{self.peak_rss_bytes / 2**20:.0f} MiB"))
        if self.resume_s:
            rows.append(("resume, until the first new request", ", ".join(f"{s:.2f} s" for s in self.resume_s)))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


def _vmhwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _count(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


SMALL_SHAPE = {"max_tokens": 8, "system_tokens": 300, "user_tokens": 40}
ORIGINAL_SHAPE = {"max_tokens": 300, "system_tokens": 2400, "user_tokens": 600}
"""The original workload: a 2,400-token criteria prompt, 600-token messages, 300-token answers."""


def stress_run(n: int, kills: int, workdir: Path, *, faults: Faults = STRESS_FAULTS, poison: bool = True,
               seed: int = 3, shape: dict | None = None) -> StressOutcome:  # fmt: skip
    """Write n requests (one of them the poison), run them against the fault server, kill kvbatch `kills` times at
    random moments, resume until done."""
    rng = random.Random(seed)
    batch = write_sample(workdir / "stress.jsonl", n, **(shape or SMALL_SHAPE))
    poison_id = ""
    if poison:
        lines = batch.read_text().splitlines()
        record = json.loads(lines[n // 2])
        record["body"]["messages"][-1]["content"] += f" {POISON}"
        poison_id = record["custom_id"]
        lines[n // 2] = json.dumps(record)
        batch.write_text("\n".join(lines) + "\n")
    run_dir = workdir / "data" / "runs" / "stress"
    command = [sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--run", str(run_dir), "--no-report",
               "--no-progress", "--concurrency", "8"]  # fmt: skip
    started = time.perf_counter()
    peak = 0
    resume_s: list[float] = []
    with RunningFaultServer(free_port(), faults) as server:
        command += ["--url", server.url]

        def convicting() -> bool:
            """The poison has crashed the server but is not yet in errors.jsonl: a kill now would restart its
            conviction from nothing (the suspects are the invocation's own), so the kill waits for it."""
            if not poison_id or not server.server.counts.get("crash (poison)"):
                return False
            return poison_id not in {line["custom_id"] for line in _lines(run_dir / "errors.jsonl")}

        for kill in range(kills + 1):
            before = _count(run_dir / "results.jsonl")
            began = time.perf_counter()
            process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            kill_at = before + rng.randint(max(n // (kills + 2) // 2, 1), max(n // (kills + 2), 2))
            resumed = False
            while process.poll() is None:
                peak = max(peak, _vmhwm(process.pid))
                done = _count(run_dir / "results.jsonl")
                if not resumed and done > before:
                    resumed = True
                    if kill > 0:
                        resume_s.append(time.perf_counter() - began)
                if kill < kills and done >= kill_at and not convicting():
                    process.kill()
                    break
                time.sleep(0.05)
            output = process.communicate()[0].decode(errors="replace")
            if kill == kills and process.returncode not in (0, 1):  # 1: done, some failed for good (the poison)
                raise RuntimeError(f"the last invocation failed ({process.returncode}):\n{output[-3000:]}")
        counts = dict(server.server.counts)
    wall = time.perf_counter() - started
    ids = [line["custom_id"] for line in _lines(run_dir / "results.jsonl")]
    failed = [line["custom_id"] for line in _lines(run_dir / "errors.jsonl")]
    expected = {json.loads(line)["custom_id"] for line in batch.read_text().splitlines()}
    summary = json.loads((run_dir / "summary.json").read_text())
    duplicates = sum(c - 1 for c in collections.Counter(ids + failed).values() if c > 1)
    return StressOutcome(n, kills, counts, summary["retries"], len(ids), duplicates,
                         len(expected - set(ids) - set(failed)), failed, poison_id, wall, summary["waited_s"],
                         peak, resume_s)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--big-n", type=int, default=0, help="also the large input against an instant server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvbatch-stress-") as scratch:
        outcome = stress_run(args.n, args.kills, Path(scratch))
        print(f"\nstress: {args.n:,} requests against the fault-injecting server\n")
        print(outcome.table())
    if args.big_n:
        with tempfile.TemporaryDirectory(prefix="kvbatch-big-") as scratch:
            big = stress_run(args.big_n, args.kills, Path(scratch), poison=False, shape=ORIGINAL_SHAPE)
            size = (Path(scratch) / "stress.jsonl").stat().st_size
            print(f"\nlarge input: {args.big_n:,} requests ({size / 2**30:.1f} GiB), the same faults, no poison\n")
            print(big.table())


if __name__ == "__main__":
    main()
