# %% [markdown]
# # kvbatch run report
# Throughput and memory over time, prefix-cache hits, prompt tokens saved, the plan, and the requests that failed.

# %% [parameters]
run_dir = "data/runs/requests"

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from kvbatch import results as R

run = Path(run_dir)
summary = R.load_json(run, "summary.json")
plan = R.load_json(run, "plan.json").get("plan", {})
metrics = R.load_metrics(run)
memory = R.load_memory(run)
errors = R.load_errors(run)
events = R.load_events(run)
display(Markdown(f"**Run** `{run}`: {summary.get('completed_total')} done, {summary.get('failed_total')} failed for good, "
                 f"{summary.get('requests_per_s')} requests/s in this invocation ({summary.get('elapsed_s')} s)."))

# %% [markdown]
# ## Summary

# %%
keys = ["requests_in_input", "completed_total", "failed_total", "retries", "elapsed_s", "requests_per_s", "mode",
        "parallel_slots", "prompt_tokens", "cached_prompt_tokens", "cache_share_of_prompt_tokens",
        "system_prompt_share_served_from_cache", "completion_tokens", "memory_peak_bytes", "memory_probe"]
pd.DataFrame({"value": [summary.get(k) for k in keys]}, index=keys)

# %% [markdown]
# ## Throughput and memory over time

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
rate = R.throughput_per_interval(metrics, 10.0)
ax1.step(rate["t_s"], rate["requests_per_s"], where="post")
ax1.set(title="Requests finished per second (10 s bins)", xlabel="seconds since start", ylabel="requests/s")
if not memory.empty:
    t0 = memory["t_unix_s"].min()
    ax2.plot(memory["t_unix_s"] - t0, memory["used_bytes"] / 2**20)
    ax2.set(title=f"Server memory ({memory['probe'].iloc[-1]})", xlabel="seconds since start", ylabel="MiB")
else:
    ax2.set_title("no memory samples (no probe for this server)")
fig.tight_layout()

# %% [markdown]
# ## Prefix cache: hits and prompt tokens saved

# %%
per_prefix = pd.DataFrame(summary.get("per_prefix", {})).T
if not per_prefix.empty:
    per_prefix["cache_share"] = per_prefix["cached_tokens"] / per_prefix["prompt_tokens"].where(per_prefix["prompt_tokens"] > 0)
without_cache = summary.get("prompt_tokens") or 0
evaluated = without_cache - (summary.get("cached_prompt_tokens") or 0)
display(Markdown(f"Prompt tokens evaluated: **{evaluated:,}** of {without_cache:,} sent "
                 f"(**{(without_cache - evaluated):,}** served from the prefix cache). "
                 f"Planned: {plan.get('prompt_tokens_evaluated', 0):,} of {plan.get('prompt_tokens_without_cache', 0):,}."))
per_prefix

# %%
if not metrics.empty and metrics["cached_tokens"].notna().any():
    fig, ax = plt.subplots(figsize=(12, 3.2))
    ax.plot(range(len(metrics)), metrics["cached_tokens"], ".", label="cached prompt tokens")
    ax.plot(range(len(metrics)), metrics["prompt_tokens"], ".", alpha=0.5, label="prompt tokens")
    ax.set(title="Cached vs total prompt tokens per request (in completion order)", xlabel="request", ylabel="tokens")
    ax.legend()

# %% [markdown]
# ## The plan

# %%
pd.DataFrame({"value": [str(v) for v in plan.values()]}, index=list(plan.keys()))

# %% [markdown]
# ## Events (recoveries, back-offs, concurrency trials, memory reactions)

# %%
events if not events.empty else Markdown("No events.")

# %% [markdown]
# ## Requests that failed for good

# %%
errors if not errors.empty else Markdown("No request failed.")

# %% [markdown]
# ## A few answers (text is escaped)

# %%
R.load_results(run).head(5)[["custom_id", "finish_reason", "completion_tokens", "answer"]]
