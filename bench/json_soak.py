"""A soak of JSON-schema answers on the embedded server: what grows when llama-server builds a grammar per request,
and whether the plan bounds it. For each in-flight count (1, 4 and the plan's own slots), `kvbatch run` sends the
sample's screening requests asking for `ANSWER_SCHEMA` (2,400-token criteria; shorter messages than the shipped
sample's, so hundreds of answers fit in minutes), with --parallel and --concurrency at that count and drain-and-
restart off (--restart-above 1TiB: the soak measures what the run would otherwise let go). From the run folder's
own memory.csv and metrics.jsonl it prints, side by side:

  planned peak, measured peak and their ratio; the memory once every slot has served (warm) and at the end; what
  warm holds above the plan, per slot (the bounded part: each slot's grammar and sampler state); and the drift over
  the run's second half (the sustained load's rule: end minus start of the second half, each a mean of samples),
  with the drift the sustained load allows (the unbounded part: ~0 when flat).

Usage: .venv/bin/python bench/json_soak.py [--n 120] [--counts 1,4,plan] [--user-tokens 150]
"""

from __future__ import annotations

import argparse
import bisect
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kvbatch.batch import records
from kvbatch.batch.inputs.sample import write_sample
from kvbatch.batch.plan.plan_record import read_plan
from kvbatch.batch.records import MemorySample
from kvbatch.batch.runfolder import RunFolder
from kvbatch.measure.sustained import allowed_drift, drift_over_second_half

MIB = 2**20


def kvbatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbatch.cli", *args], cwd=cwd, capture_output=True, text=True)


def plan_slots(batch: Path, work: Path) -> int:
    planned = kvbatch("plan", str(batch), "--json", cwd=work)
    if planned.returncode:
        raise SystemExit(planned.stdout + planned.stderr)
    return int(json.loads(planned.stdout)["parallel_slots"])


def soak(batch: Path, work: Path, count: int) -> dict:
    name = f"soak-{count}"
    result = kvbatch("run", str(batch), "--run", name, "--parallel", str(count), "--concurrency", str(count),
                     "--restart-above", "1TiB", "--no-report", "--no-progress", cwd=work)  # fmt: skip
    if result.returncode:
        raise SystemExit(result.stdout + result.stderr)
    folder = RunFolder(work / "data" / "runs" / name)
    planned = read_plan(folder.plan)["memory"]["total_bytes"]
    samples = [s for s in map(MemorySample.parse, folder.memory.read_text().splitlines()) if s is not None]
    answered = sorted(records.metrics(folder.metrics), key=lambda m: m["t_done_unix_s"])
    done_times = [m["t_done_unix_s"] for m in answered]
    slots_seen: set = set()
    warm_t = done_times[-1]
    for metric in answered:
        slots_seen.add(metric["slot"])
        if len(slots_seen) >= count:
            warm_t = metric["t_done_unix_s"]
            break
    after = [s for s in samples if s.t_unix_s >= warm_t]
    drift = drift_over_second_half([(s.t_unix_s, s.used_bytes) for s in samples]) or 0.0
    peak = max(s.used_bytes for s in samples)
    warm = after[0].used_bytes if after else peak
    sample_times = [s.t_unix_s for s in samples]

    def memory_when_done(tenths: int) -> int:
        """The last sample taken by the time `tenths` tenths of the requests had been answered."""
        t_done = done_times[max(len(done_times) * tenths // 10 - 1, 0)]
        return samples[max(bisect.bisect_right(sample_times, t_done) - 1, 0)].used_bytes

    by_tenth = [memory_when_done(k) for k in range(1, 11)]
    return {"count": count, "requests": len(done_times), "planned": planned, "peak": peak, "warm": warm,
            "by_tenth": by_tenth,
            "end": samples[-1].used_bytes, "warm_done": bisect.bisect_right(done_times, warm_t),
            "per_slot_above_plan": (warm - planned) / count, "drift": drift, "allowed": allowed_drift(peak),
            "seconds": done_times[-1] - done_times[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--counts", default="1,4,plan")
    parser.add_argument("--user-tokens", type=int, default=150)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        batch = write_sample(work / "json.jsonl", args.n, json_answer=True, user_tokens=args.user_tokens)
        counts = [plan_slots(batch, work) if c == "plan" else int(c) for c in args.counts.split(",")]
        for count in counts:
            print(f"soak at {count} in flight ({args.n} requests)...", flush=True)
            rows.append(soak(batch, work, count))
    print("\n| in flight | requests | planned peak | measured peak | peak/plan | warm (at n done) | end | "
          "warm above plan per slot | drift over the second half (allowed) | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['count']} | {r['requests']} | {r['planned'] / MIB:.1f} MiB | {r['peak'] / MIB:.1f} MiB | "
              f"{r['peak'] / r['planned']:.3f} | {r['warm'] / MIB:.1f} MiB ({r['warm_done']}) | "
              f"{r['end'] / MIB:.1f} MiB | {r['per_slot_above_plan'] / MIB:+.2f} MiB | "
              f"{r['drift'] / MIB:+.1f} MiB ({r['allowed'] / MIB:.0f}) | {r['seconds']:.0f} s |")  # fmt: skip
    print("\nmemory when each tenth of the requests was done (MiB, the sample at that moment):")
    for r in rows:
        print(f"{r['count']} in flight: " + " ".join(f"{b / MIB:.0f}" for b in r["by_tenth"]))


if __name__ == "__main__":
    main()
