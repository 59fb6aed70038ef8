# %% [markdown]
# # Safe context under a memory budget
# The largest context that loads *and* serves a request filling it, found by bisection between a floor and the
# model's trained context. The budget is enforced for real: a hard address-space cap (RLIMIT_AS) on the server
# on a CPU machine, the card's memory on a GPU. A failed start, an out-of-memory error or a crash is "too big".

# %% [parameters]
backend = "embedded"
url = None
model = None
model_path = None
budget = "+24MiB"  # the memory the server may use ("8GiB"), or headroom above the model's own need ("+24MiB")
safety_margin = 0.8
floor_tokens = 1024
ceiling_tokens = None  # default: the model's trained context
step_tokens = 256
fill_fraction = 1.0
cache_type_k = "f16"
cache_type_v = "f16"
swa_full = False
out_dir = "data/measurements"

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from kvbatch import measurements as M
from kvbatch.measure import max_loads
from kvbatch.server import ServerConfig

arch = M.architecture(backend, url=url, model=model, model_path=model_path)
name = M.model_name(backend, model, model_path)
config = ServerConfig(model_path=Path(model_path) if model_path else None, cache_type_k=cache_type_k,
                      cache_type_v=cache_type_v, swa_full=swa_full)
out = M.result_path(name, config, Path(out_dir))
loader = M.make_loader(backend, url=url, model=model, config=config)
search = M.safe_context(loader, arch, budget, margin=safety_margin, floor_tokens=floor_tokens,
                        step_tokens=step_tokens, fill_fraction=fill_fraction, out=out, ceiling_tokens=ceiling_tokens)
budget_text = search["budget_text"]
result = search["result"]
ceiling = search["section"]["ceiling_tokens"]
display(Markdown(
    f"Budget **{budget_text}** ({search['section']['enforced_by']}): the largest context that "
    f"loaded and served a full request is **{result.max_context_tokens} tokens**; with a {safety_margin:.0%} margin "
    f"the safe context is **{result.safe_context_tokens} tokens**. It took **{result.loads} loads** "
    f"(bound: {max_loads(floor_tokens, ceiling, step_tokens)})."))

# %%
probes = search["probes"]
fig, ax = plt.subplots(figsize=(8, 3.5))
colors = ["tab:green" if fits else "tab:red" for fits in probes["fits"]]
ax.scatter(range(1, len(probes) + 1), probes["context_tokens"], c=colors, s=60)
if result.max_context_tokens:
    ax.axhline(result.max_context_tokens, color="tab:green", ls="--", label="largest that fits")
    ax.axhline(result.safe_context_tokens, color="tab:blue", ls=":", label="safe (with margin)")
ax.set(title="Probes in order (green: loaded and served, red: too big)", xlabel="load #", ylabel="context tokens")
ax.legend()
probes
