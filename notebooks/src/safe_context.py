# %% [markdown]
# # Safe context under a memory budget
# The largest context that loads *and* serves a request filling it, found by galloping from the fitted line's
# guess and then bisecting between a floor and the model's trained context. The budget is the memory the server
# may use, enforced for real: a hard address-space cap (RLIMIT_AS) on the server on a CPU machine, the card's
# memory on a GPU. A failed allocation, an out-of-memory error, a crash while serving, memory above the budget,
# or (Ollama on a GPU) layers moved to the CPU is "too big"; any other failure stops the search with its reason.
# The safe context is the largest that worked times the margin, always below it.

# %% [parameters]
from kvbatch import defaults

backend = "embedded"
url = None
model = None
model_path = None
kv_type = "f16"
parallel = 1
budget = defaults.DEMO_BUDGET  # the memory the server may use ("8GiB", "auto"), or the demo: headroom above the need
safety_margin = defaults.SAFETY_MARGIN
floor_tokens = 1024
ceiling_tokens = None  # default: the model's trained context
step_tokens = 256
fill_fraction = 1.0
swa_full = False
out_dir = str(defaults.MEASUREMENTS_DIR)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display
from kvbatch.measure import steps
from kvbatch.measure.experiments import max_loads
from kvbatch.measure.kvmodel import KvCacheTypes
from kvbatch.measure.result import model_identity
from kvbatch.report.display import integer_axis, table
from kvbatch.serve.config import ServerConfig

arch = steps.architecture(backend, url=url, model=model, model_path=model_path)
identity = model_identity(backend, model, model_path)
types = KvCacheTypes(kv_type, kv_type, swa_full=swa_full)
config = ServerConfig(model_path=Path(model_path) if model_path else None, cache_type_k=kv_type, cache_type_v=kv_type,
                      swa_full=swa_full)
out = steps.result_file(backend, model, model_path, types, out_dir)
loader = steps.make_loader(backend, url=url, model=model, config=config, parallel=parallel, measurement=out)
try:
    search = steps.safe_context(loader, arch, budget, margin=safety_margin, floor_tokens=floor_tokens,
                                step_tokens=step_tokens, fill_fraction=fill_fraction, out=out, backend=backend,
                                model=identity, types=types, ceiling_tokens=ceiling_tokens)
finally:
    loader.close()
result = search["result"]
found = (f"the largest context that loaded and served a full request is **{result.max_context_tokens} tokens**; "
         f"with a {safety_margin:.0%} margin the safe context is **{result.safe_context_tokens} tokens**"
         if result.max_context_tokens else f"**not even the floor, {floor_tokens} tokens, fits**: "
         f"{result.steps[0].reason if result.steps else 'no load was made'}")
display(Markdown(
    f"Budget **{search['budget'].text}** ({search['enforced_by']}): {found}. It took **{result.loads} loads** "
    f"(bound: {max_loads(floor_tokens, search['ceiling'], step_tokens)})."
    + ("\n\n*The budget is the 2-core demo: the plan of a run never takes it as yours.*"
       if search["budget"].is_demo else "")
    + f"\n\n**Server**: {search['measurement'].build.get('build', 'Ollama at ' + str(url))}; flags: "
    + ", ".join(f"{k}={v}" for k, v in search["measurement"].server_flags.items()
                if v is not None and k != "instruction_sets")))

# %%
steps = search["steps"]
fig, ax = plt.subplots(figsize=(8, 3.5))
colors = ["tab:green" if fits else "tab:red" for fits in steps["fits"]]
ax.scatter(range(1, len(steps) + 1), steps["context_tokens"], c=colors, s=60)
if result.max_context_tokens:
    ax.axhline(result.max_context_tokens, color="tab:green", ls="--", label="largest that fits")
    ax.axhline(result.safe_context_tokens, color="tab:blue", ls=":", label="safe (with margin)")
ax.set(title="Loads in order (green: loaded and served, red: does not fit or could not fill)", xlabel="load #", ylabel="context tokens")
integer_axis(ax.xaxis)
ax.legend()
shown = steps.assign(load=range(1, len(steps) + 1),
                     result=[("fits" if fits else "could not fill" if str(reason).startswith("could not fill")
                              else "does not fit") for fits, reason in zip(steps["fits"], steps["reason"])])
table(shown[["load", "context_tokens", "result", "reason", "seconds"]], duration_columns=["seconds"],
      rename={"context_tokens": "context (tokens)", "seconds": "time"})
