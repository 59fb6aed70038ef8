"""Does the plan bound the peak? Plan a batch at each slot count, run a sustained load at that plan on the embedded
server until every slot has served its context twice, and print the peak beside the plan's memory (and the plan
without what serving adds, as it was priced before).

Usage: .venv/bin/python tools/plan_bound.py [--input data/sample/requests.jsonl] [--slots 1,4,8] [--slot-ctx 3584]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from dataclasses import replace
from pathlib import Path

from kvbatch import defaults
from kvbatch.aio import run_sync
from kvbatch.batch.run.runner import load_input, plan_only
from kvbatch.batch.runfolder import RunFolder
from kvbatch.batch.settings import BatchSettings
from kvbatch.measure.sustained import sustained_load
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.probes import probe_for_server
from kvbatch.serve.server import EmbeddedServer

MIB = 2**20


def bound_at(input_path: Path, slots: int, slot_context: int, scratch: Path) -> tuple[float, float, float, float]:
    """(memory after load, peak, the plan's memory, the plan less what serving adds), in bytes."""
    settings = BatchSettings(input_path=input_path, folder=RunFolder(scratch / f"run-{slots}"), slots=slots,
                             slot_context_tokens=slot_context)  # fmt: skip
    prepared = plan_only(settings, say=lambda *_: None)
    plan, memory = prepared.plan, prepared.plan.memory
    _, requests_fn = load_input(settings)
    bodies = [r.body for r in itertools.islice(requests_fn(frozenset()), max(2 * plan.layout.slots, 8))]
    config = replace(prepared.plans[0].config, context_tokens=plan.layout.total_context_tokens,
                     parallel_slots=plan.layout.slots)  # fmt: skip
    with EmbeddedServer(config) as server:
        probe = probe_for_server(server.pid, server.log_text)
        after_load = probe.read()

        async def go():
            async with get_backend("openai", server.url, slot_pinning=True,
                                   options=BackendOptions(api_key=server.api_key)) as backend:
                return await sustained_load(backend, probe, bodies, slots=plan.layout.slots,
                                            slot_context_tokens=plan.layout.slot_context_tokens, duration_s=0.0,
                                            planned_bytes=memory.counted_bytes)  # fmt: skip

        outcome = run_sync(go())
    return after_load, outcome.memory_peak_bytes, memory.counted_bytes, memory.counted_bytes - memory.serving_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(defaults.SAMPLE_INPUT))
    parser.add_argument("--slots", default="1,4,8")
    parser.add_argument("--slot-ctx", type=int, default=3584)
    args = parser.parse_args()
    print("| layout | after load | peak | plan | plan without serving | peak within the plan |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for slots in (int(s) for s in args.slots.split(",")):
            after, peak, planned, unpriced = bound_at(Path(args.input), slots, args.slot_ctx, Path(scratch))
            print(f"| {slots} x {args.slot_ctx:,} | {after / MIB:.1f} MiB | {peak / MIB:.1f} MiB | "
                  f"{planned / MIB:.1f} MiB | {unpriced / MIB:.1f} MiB | {peak <= planned} |", flush=True)


if __name__ == "__main__":
    main()
