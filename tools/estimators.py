"""The estimators' verdict for any GGUF, without a notebook: start the embedded server at each context and slot
count, read its KV lines and memory after load, and print what kvbatch's model, a fit measured at one slot,
llama-fit-params, Ollama's rule and the naive rule predict beside it, each with its error.

Usage: .venv/bin/python tools/estimators.py [MODEL.gguf] [--contexts 2048,8192,32768] [--slots 1,4,16]
       [--kv-type f16]   (default model: the shipped Gemma 3 270M)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from kvbatch.measure.estimators import ESTIMATORS, judge, observe_embedded, sentences
from kvbatch.measure.kvmodel import KvCacheTypes, architecture_from_gguf


def _mib(value: float | None) -> str:
    return f"{value / 2**20:,.1f}" if value is not None else "–"


def _pct(value: float | None) -> str:
    return f"{value:+.1%}" if value is not None else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--slots", default="1,4,16")
    parser.add_argument("--kv-type", default="f16")
    args = parser.parse_args()
    if args.model is None:
        from kvbatch.serve.server import default_model_path

        model = default_model_path()
    else:
        model = Path(args.model)
    types = KvCacheTypes(args.kv_type, args.kv_type)
    arch = architecture_from_gguf(model)
    contexts = [int(c) for c in args.contexts.split(",")]
    observed = observe_embedded(model, types, contexts, [int(s) for s in args.slots.split(",")])
    one_slot = [o for o in observed if o.slots == 1]  # the line a one-slot measurement fits
    fit = None
    if len(one_slot) >= 2:
        slope, intercept = np.polyfit([o.context for o in one_slot], [o.after_load_bytes for o in one_slot], 1)
        fit = (float(intercept), float(slope))
    rows = judge(model, arch, types, observed, fit_line=fit)
    print(f"{model.name}: {arch.block_count} layers ({len(arch.global_layers)} global), {arch.head_count_kv} KV "
          f"heads x {arch.key_length}, window {arch.sliding_window}; KV cache {types.label}\n")  # fmt: skip
    print("| context x slots | server KV (log) | server after load | estimator | its KV | KV error | its memory "
          "| memory error |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    by_point = {(o.context, o.slots): o for o in observed}
    for row in sorted(rows, key=lambda r: (r.slots, r.context, ESTIMATORS.index(r.estimator))):
        seen = by_point[(row.context, row.slots)]
        print(f"| {row.context:,} x {row.slots} | {_mib(seen.kv_log_bytes)} MiB | {_mib(seen.after_load_bytes)} MiB "
              f"| {row.estimator} | {_mib(row.kv_bytes)} | {_pct(row.kv_error)} | {_mib(row.total_bytes)} "
              f"| {_pct(row.total_error)} |")  # fmt: skip
    print()
    for sentence in sentences(rows, arch).values():
        print(f"- {sentence}")


if __name__ == "__main__":
    main()
