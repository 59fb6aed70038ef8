# %% [markdown]
# # Sustained load: does the plan hold?
# Requests of the batch's own sizes (by default the shipped sample's shape) run at the plan's slots and per-slot
# context, one worker per slot, until every slot has served its own context's worth of tokens (over at least two
# requests) and the set duration has passed, whichever is later, up to a ceiling. Memory is compared with the budget
# every interval. The verdict is FAILED on any request error, on memory above the budget, on a peak above the plan's
# memory (the plan must bound what the server takes), on a drift above max(1 %, 64 MiB) over the second half, or
# when the ceiling came before every slot was filled.

# %% [parameters]
from kvbatch import defaults

backend = "embedded"  # embedded, or "ollama" with `url` and `model`
url = None
model = None
model_path = None
kv_type = "f16"
parallel = 1
input_path = str(defaults.SAMPLE_INPUT)  # the batch whose request sizes (and plan) are tested
budget = None  # the memory the server may use (default: the machine's, as the plan takes it)
slots = None  # default: the plan's
slot_context_tokens = None  # default: the plan's
duration_s = defaults.SUSTAINED_DURATION_S  # the least time; it runs on until every slot has served its context
ceiling_s = defaults.SUSTAINED_CEILING_S
interval_s = defaults.SUSTAINED_INTERVAL_S
out_dir = str(defaults.MEASUREMENTS_DIR)

# %%
import itertools
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display
from kvbatch.aio import run_sync
from kvbatch.batch.runfolder import RunFolder
from kvbatch.batch.run.runner import load_input, plan_only
from kvbatch.batch.settings import BatchSettings
from kvbatch.measure import steps
from kvbatch.measure.kvmodel import KvCacheTypes
from kvbatch.measure.result import model_identity
from kvbatch.measure.sustained import judge_fit, sustained_load
from kvbatch.report.display import integer_axis, size
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.probes import OllamaPsProbe, probe_for_server
from kvbatch.serve.server import EmbeddedServer

types = KvCacheTypes(kv_type, kv_type)
identity = model_identity(backend, model, model_path)
out = steps.result_file(backend, model, model_path, types, out_dir)
settings = BatchSettings(
    input_path=Path(input_path), folder=RunFolder(Path("data/runs/sustained-load")), kv_type=kv_type,
    urls=[url] if backend == "ollama" else [], backend="ollama" if backend == "ollama" else "openai", model=model,
    parallel=parallel, memory_budget=budget, slots=slots, slot_context_tokens=slot_context_tokens,
    server=ServerConfig(model_path=Path(model_path) if model_path else None, cache_type_k=kv_type,
                        cache_type_v=kv_type),
)
prepared = plan_only(settings, say=lambda *_: None)
plan = prepared.plan
layout = plan.layout
display(Markdown(f"**Plan under test** ({settings.input_path}): {layout.describe()}, KV cache {plan.kv_types.label}; "
                 f"predicted memory {size(plan.memory.counted_bytes) if plan.memory else 'not modelled'}; "
                 f"budget {plan.budget.text if plan.budget else 'none'}."))
report, requests_fn = load_input(settings)
bodies = [request.body for request in itertools.islice(requests_fn(frozenset()), max(4 * layout.slots, 16))]
budget_bytes = plan.budget.bytes if plan.budget else None
planned_bytes = plan.memory.counted_bytes if plan.memory else None


async def measure_at(backend_obj, probe):
    return await sustained_load(backend_obj, probe, bodies, slots=layout.slots,
                                slot_context_tokens=layout.slot_context_tokens, duration_s=duration_s,
                                ceiling_s=ceiling_s, interval_s=interval_s, budget_bytes=budget_bytes,
                                planned_bytes=planned_bytes)


if backend == "ollama":
    async def go():
        async with get_backend("ollama", url, model=model, layout=layout) as ollama:
            result = await measure_at(ollama, OllamaPsProbe(ollama, field="size_vram" if plan.budget and plan.budget.on_gpu
                                                                     else "size"))
            loaded = await ollama.loaded()  # a layout split between the card and the CPU does not fit
            share = loaded.vram_bytes / loaded.size_bytes if loaded and loaded.size_bytes else None
            return judge_fit(result, share)
    outcome = run_sync(go())
    flags = {"url": url, "model": model}
else:
    config = replace(prepared.plans[0].config, context_tokens=layout.total_context_tokens, parallel_slots=layout.slots)
    with EmbeddedServer(config) as server:
        async def go():
            async with get_backend("openai", server.url, slot_pinning=True, options=BackendOptions(api_key=server.api_key)) as llama:
                return await measure_at(llama, probe_for_server(server.pid, server.log_text))
        outcome = run_sync(go())
        flags = server.config.flags()
steps.save_sustained(out, outcome, backend=backend, model=identity, types=types, layout=layout)
verdict = "PASSED" if outcome.passed else "FAILED: " + "; ".join(outcome.reasons)
served = ", ".join(f"slot {i}: {s.requests} requests, {s.tokens:,} tokens" for i, s in enumerate(outcome.served))
display(Markdown(f"**{verdict}**. {outcome.requests} requests in {outcome.duration_s:.0f} s at {layout.describe()} "
                 f"(stopped by {outcome.stopped_by}; ceiling {outcome.ceiling_s:.0f} s); {served}; "
                 f"memory peak {size(outcome.memory_peak_bytes)} (plan {size(planned_bytes)}, "
                 f"budget {size(budget_bytes)}), "
                 f"drift over the second half {size(outcome.memory_drift_bytes)}; {len(outcome.errors)} request "
                 "error(s)."))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
if outcome.memory_series:
    ax1.plot([t for t, _ in outcome.memory_series], [m / 2**20 for _, m in outcome.memory_series], label="server")
if budget_bytes and outcome.memory_series and budget_bytes < 4 * max(m for _, m in outcome.memory_series):
    ax1.axhline(budget_bytes / 2**20, color="tab:red", ls="--", label="budget")
if plan.memory:
    ax1.axhline(plan.memory.counted_bytes / 2**20, color="tab:gray", ls=":", label="plan's prediction")
ax1.set(title="Server memory under load", xlabel="seconds", ylabel="MiB")
ax1.set_ylim(bottom=0)
ax1.legend()
if sum(1 for n in outcome.requests_per_interval if n) >= 2:
    ax2.bar([i * interval_s for i in range(len(outcome.requests_per_interval))], outcome.requests_per_interval,
            width=interval_s * 0.8, align="edge")
    ax2.set(title=f"Requests finished per {interval_s:.0f} s interval", xlabel="seconds", ylabel="requests")
    integer_axis(ax2.yaxis)
else:  # one bar (or none) is no rate over time: say what happened instead of drawing an empty axis
    ax2.set_axis_off()
    ax2.text(0.5, 0.5, f"{outcome.requests} request(s) finished in {outcome.duration_s:.0f} s:\n"
             f"too few {interval_s:.0f} s intervals with a finished request\nto chart a rate over time",
             ha="center", va="center", transform=ax2.transAxes)
fig.tight_layout()
