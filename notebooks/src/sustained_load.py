# %% [markdown]
# # Sustained load at the planned configuration
# Requests for a set time at the configuration the measurements give; memory sampled every second and
# throughput counted per interval. It passes only if memory does not drift and throughput holds.

# %% [parameters]
backend = "embedded"  # embedded, or "openai" / "ollama" with `url`
url = None
model = None
model_path = None
duration_s = 60
in_flight = 1
interval_s = 15
context_tokens = None  # default: the safe context measured for this model, else 4096
max_tokens = 32
drift_tolerance = 0.05
cache_type_k = "f16"
cache_type_v = "f16"
swa_full = False
out_dir = "data/measurements"

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from kvbatch import measurements as M
from kvbatch.sample import candidate_message, system_prompt
from kvbatch.server import ServerConfig
import random

name = M.model_name("ollama" if backend == "ollama" else "embedded", model, model_path)
config = ServerConfig(model_path=Path(model_path) if model_path else None, cache_type_k=cache_type_k,
                      cache_type_v=cache_type_v, swa_full=swa_full)
out = M.result_path(name, config, Path(out_dir))
saved = json.loads(out.read_text()) if out.exists() else {}
context = context_tokens or saved.get("safe_context_tokens") or 4096
config = ServerConfig(**{**config.__dict__, "context_tokens": int(context), "parallel_slots": in_flight})
body = {"messages": [{"role": "system", "content": system_prompt(600)},
                     {"role": "user", "content": candidate_message(random.Random(3), 100)}],
        "max_tokens": max_tokens, "temperature": 0}
run = M.sustained(config, body, duration_s=duration_s, in_flight=in_flight, interval_s=interval_s, out=out,
                  url=url, backend_name="ollama" if backend == "ollama" else "openai", model=model,
                  drift_tolerance=drift_tolerance)
result = run["result"]
verdict = "PASSED" if result.passed else "FAILED: " + "; ".join(result.reasons)
display(Markdown(f"**{verdict}** at context {context} x {in_flight} in flight: {result.requests} requests in "
                 f"{result.duration_s:.0f} s; memory drift {result.memory_drift_share:+.2%}; slowest interval "
                 f"{result.throughput_floor_share:.0%} of the median."))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
memory = run["memory"]
ax1.plot(memory["t_s"], memory["used_bytes"] / 2**20)
ax1.set(title="Server memory under load", xlabel="seconds", ylabel="MiB")
ax1.set_ylim(bottom=0)
ax2.bar([i * interval_s for i in range(len(result.requests_per_interval))],
        [n / interval_s for n in result.requests_per_interval], width=interval_s * 0.8, align="edge")
ax2.set(title=f"Throughput per {interval_s} s interval", xlabel="seconds", ylabel="requests/s")
fig.tight_layout()
