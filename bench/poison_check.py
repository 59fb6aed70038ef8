"""The poison check: 40 requests through `kvbatch run` against the fault server, one of which crashes it each time it
arrives (every connection dropped, idle keep-alive ones too; every new connection and the health check reset for
`--down-s`), at 4 and 16 in flight, the poison among the first requests and among the last. One table: the
requests sent alone and what their solo turns showed, the crashes, who failed for good, and whether every other
custom_id is in results.jsonl exactly once. (tests/test_poison.py asserts the same on every push.)

Usage: .venv/bin/python bench/poison_check.py [--n 40] [--down-s 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_server import POISON, Faults, RunningFaultServer  # noqa: E402
from kvbatch.batch.inputs.sample import write_sample  # noqa: E402
from kvbatch.report.results import load_errors, load_events, solo_turns  # noqa: E402
from kvbatch.serve.server import free_port  # noqa: E402


def one(n: int, in_flight: int, index: int, down_s: float, scratch: Path) -> dict:
    batch = write_sample(scratch / "in.jsonl", n, max_tokens=6, system_tokens=300, user_tokens=40)
    lines = batch.read_text().splitlines()
    request = json.loads(lines[index])
    request["body"]["messages"][-1]["content"] = f"{POISON}: this one crashes the server"
    lines[index] = json.dumps(request)
    batch.write_text("\n".join(lines) + "\n")
    faults = Faults(down_s=down_s, down_resets=True, service_s=0.1, slots=in_flight)
    with RunningFaultServer(free_port(), faults) as server:
        subprocess.run([sys.executable, "-m", "kvbatch.cli", "run", str(batch), "--url", server.url, "--no-report",
                        "--no-progress", "--concurrency", str(in_flight)], cwd=scratch, capture_output=True,
                       check=False)  # fmt: skip
        crashes = server.server.counts["crash (poison)"]
    run = scratch / "data" / "runs" / "in"
    errors = load_errors(run)
    solo = solo_turns(load_events(run), errors)
    done = [json.loads(line)["custom_id"] for line in (run / "results.jsonl").read_text().splitlines()]
    others = {json.loads(line)["custom_id"] for line in lines} - {request["custom_id"]}
    once = sorted(done) == sorted(others) and max(collections.Counter(done).values()) == 1
    return {"in flight": in_flight, "poison": request["custom_id"], "crashes": crashes,
            "sent alone": ", ".join(f"{r['custom_id']} ({r['solo attempts']} solo: {r['verdict']})"
                                    for r in solo.to_dict("records")),
            "failed for good": ", ".join(errors["custom_id"]) or "none", "others exactly once": once}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--down-s", type=float, default=2.0)
    args = parser.parse_args()
    rows = []
    for in_flight in (4, 16):
        for index in (1, args.n - 2):
            with tempfile.TemporaryDirectory() as scratch:
                rows.append(one(args.n, in_flight, index, args.down_s, Path(scratch)))
    for row in rows:
        print(" | ".join(f"{key}: {value}" for key, value in row.items()), flush=True)


if __name__ == "__main__":
    main()
