# %% [markdown]
# # kvbatch run report
# Throughput and memory over time, prefix-cache hits, prompt tokens saved, the plan (and its estimate against what
# happened), the servers, and the requests that failed.

# %% [parameters]
run_dir = "data/runs/requests"

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from kvbatch.report import results as R
from kvbatch.report.display import clock, duration, integer_axis, key_values, share, size, table

run = Path(run_dir)
summary = R.load_summary(run)
plan = R.load_plan(run)
metrics = R.load_metrics(run)
memory = R.load_memory(run)
errors = R.load_errors(run)
events = R.load_events(run)
display(Markdown(f"**Run** `{run}`: {summary.get('completed_total')} done, {summary.get('failed_total')} failed for "
                 f"good, {summary.get('requests_per_s')} requests/s in this invocation "
                 f"({duration(summary.get('elapsed_s'))})."))

# %% [markdown]
# ## Summary

# %%
key_values([
    ("requests in the input", f"{summary.get('requests_in_input', 0):,}"),
    ("done (all invocations)", f"{summary.get('completed_total', 0):,}"),
    ("failed for good", f"{summary.get('failed_total', 0):,}"),
    ("retries", f"{summary.get('retries', 0):,}"),
    ("time waiting out faults and recoveries", duration(summary.get("waited_s"))),
    ("time (this invocation)", duration(summary.get("elapsed_s"))),
    ("estimated by the plan", duration(summary.get("estimated_s"))),
    ("re-estimated from the run's own rate", duration(summary.get("re_estimated_s"))),
    ("mode", summary.get("mode")),
    ("slots x context per slot", f"{summary.get('parallel_slots')} x {summary.get('slot_context_tokens')}"),
    ("prompt tokens sent", f"{summary.get('prompt_tokens', 0):,}"),
    ("of which from the prefix cache", share(summary.get("cache_share_of_prompt_tokens"))),
    ("system prompt served from the cache", share(summary.get("system_prompt_share_served_from_cache"))),
    ("answers that reached max_tokens", f"{summary.get('answers_cut_at_max_tokens', 0):,}"),
    ("memory peak", f"{size(summary.get('memory_peak_bytes'))} ({summary.get('memory_probe') or 'no probe'})"),
    ("planned memory", size((plan.get("memory") or {}).get("total_bytes"))),
])

# %% [markdown]
# ## Throughput and memory over time

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
rate = R.throughput_per_interval(metrics, 10.0)
ax1.step(rate["t_s"], rate["requests_per_s"], where="post")
ax1.set(title="Requests finished per second (10 s bins)", xlabel="seconds since start", ylabel="requests/s")
if not memory.empty:
    t0 = memory["t_unix_s"].min()
    for endpoint, series in memory.groupby(memory.get("endpoint", pd.Series("server", index=memory.index))):
        ax2.plot(series["t_unix_s"] - t0, series["used_bytes"] / 2**20, label=str(endpoint))
    if (plan.get("memory") or {}).get("total_bytes"):
        ax2.axhline(plan["memory"]["total_bytes"] / 2**20, color="tab:gray", ls=":", label="plan")
    ax2.set(title=f"Server memory ({memory['probe'].iloc[-1]})", xlabel="seconds since start", ylabel="MiB")
    ax2.set_ylim(bottom=0)
    ax2.legend()
else:
    ax2.set_title("no memory samples (no probe for this server)")
fig.tight_layout()

# %% [markdown]
# ## Servers

# %%
endpoints = pd.DataFrame(summary.get("per_endpoint", []))
if not endpoints.empty:
    endpoints["server"] = endpoints["server"].map(lambda s: s.get("build") or s.get("url") or "")
    endpoints["requests_per_s"] = endpoints["requests_per_s"].map(lambda v: f"{v:.3f}" if v is not None else "–")
    display(table(endpoints[["label", "server", "completed", "failed", "retries", "recoveries", "requests_per_s",
                             "cache_share_of_prompt_tokens", "out_of_pool_s"]],
                  share_columns=["cache_share_of_prompt_tokens"], duration_columns=["out_of_pool_s"],
                  rename={"cache_share_of_prompt_tokens": "from cache", "out_of_pool_s": "out of the pool",
                          "requests_per_s": "requests/s"}))

# %% [markdown]
# ## Prefix cache: hits and prompt tokens saved

# %%
per_prefix = pd.DataFrame(summary.get("per_prefix", {})).T.reset_index(names="prefix")
if not per_prefix.empty:
    per_prefix["from cache"] = per_prefix["cached_tokens"] / per_prefix["prompt_tokens"].where(per_prefix["prompt_tokens"] > 0)
without_cache = summary.get("prompt_tokens") or 0
evaluated = without_cache - (summary.get("cached_prompt_tokens") or 0)
display(Markdown(f"Prompt tokens evaluated: **{evaluated:,}** of {without_cache:,} sent "
                 f"(**{(without_cache - evaluated):,}** served from the prefix cache). "
                 f"Planned: {plan.get('prompt_tokens_evaluated', 0):,} of {plan.get('prompt_tokens_without_cache', 0):,}."))
table(per_prefix[["prefix", "requests", "prompt_tokens", "cached_tokens", "prefix_tokens", "prefix_cached_tokens",
                  "misses", "from cache"]], share_columns=["from cache"],
      rename={"prompt_tokens": "prompt tokens", "cached_tokens": "from the cache", "prefix_tokens": "system prompt tokens",
              "prefix_cached_tokens": "system prompt from the cache", "misses": "cache misses"}) \
    if not per_prefix.empty else None

# %%
if not metrics.empty and metrics["cached_tokens"].notna().any():
    fig, ax = plt.subplots(figsize=(12, 3.2))
    ax.plot(range(1, len(metrics) + 1), metrics["cached_tokens"], ".", label="cached prompt tokens")
    ax.plot(range(1, len(metrics) + 1), metrics["prompt_tokens"], ".", alpha=0.5, label="prompt tokens")
    ax.set(title="Cached vs total prompt tokens per request (in completion order)", xlabel="request", ylabel="tokens")
    integer_axis(ax.xaxis)
    ax.legend()

# %% [markdown]
# ## The plan

# %%
memory_plan = plan.get("memory") or {}
key_values([
    ("slots x context per slot", f"{plan.get('parallel_slots')} x {plan.get('slot_context_tokens')} tokens"),
    ("KV cache type", plan.get("kv_cache_type")),
    ("KV cache (global + sliding window)", size(plan.get("kv_cache_bytes"))),
    ("base (weights, buffers)", size(memory_plan.get("base_bytes"))),
    ("context checkpoints", size(memory_plan.get("checkpoint_bytes"))),
    ("budget", plan.get("budget") or "–"),
    ("system prompt", f"{plan.get('system_prompt_tokens')} tokens"),
    ("largest request (p99)", f"{plan.get('request_tokens_p99')} tokens"),
    ("prompt tokens saved (planned)", share(plan.get("prompt_tokens_saved_share"))),
    ("estimated time", f"{duration(plan.get('estimated_seconds'))} ({plan.get('estimate_basis')})"),
    ("limits from", plan.get("limits_source")),
    ("measurement", plan.get("measurement_file") or plan.get("measurement_reason") or "–"),
    ("server", ", ".join(f"{k}={v}" for k, v in (plan.get("server") or {}).items() if v is not None)),
])

# %% [markdown]
# ## Events (recoveries, back-offs, concurrency trials, memory reactions)

# %%
if events.empty:
    display(Markdown("No events."))
else:
    shown = events.copy()
    shown["time"] = shown["t_unix_s"].map(clock)
    details = [c for c in shown.columns if c not in ("t_unix_s", "time", "event")]
    def readable(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    shown["details"] = shown[details].apply(lambda row: "; ".join(f"{k}: {readable(v)}" for k, v in row.items()
                                                                  if pd.notna(v) and v != ""), axis=1)
    display(table(shown[["time", "event", "details"]]))

# %% [markdown]
# ## Requests sent alone
# A request in flight during two crashes is sent alone (nothing else in flight) until it is served or has taken the
# server down alone `--max-attempts` times: only then is it failed for good. Each solo attempt and what it showed.

# %%
solo = R.solo_turns(events, errors)
table(solo) if not solo.empty else Markdown("No request was sent alone.")

# %% [markdown]
# ## Requests that failed for good

# %%
table(errors) if not errors.empty else Markdown("No request failed.")

# %% [markdown]
# ## The answers
# Requests that asked for JSON (`response_format`): the share whose first answer kept to it, the answers asked again
# and why, and, for each boolean, integer and enum field, how many answers gave each value.

# %%
answers = R.load_results(run)
asked = answers[answers.answer_attempts.notna()]  # every invocation of the run, from its journal and metrics
first = int(((asked.answer_attempts == 1) & (asked.status == "completed")).sum())
cut = summary.get("answers_cut_at_max_tokens") or 0
invalid = summary.get("invalid_answers") or {}
words = {"not_json": "not JSON", "cut": "JSON cut off at max_tokens", "schema": "against the schema"}
display(Markdown(
    f"{cut} answer(s) ended at max_tokens (`finish_reason: length`) in the last invocation. "
    + (f"{len(asked)} request(s) asked for JSON; {share(first / len(asked))} kept to it at the first attempt, "
       f"{int((asked.status == 'failed').sum())} never did; answers asked again in the last invocation: "
       + (", ".join(f"{n} {words.get(k, k)}" for k, n in invalid.items()) or "none") + "."
       if len(asked) else "No request asked for JSON.")
))
distributions = R.answer_distributions(answers)
if distributions:
    fig, axes = plt.subplots(1, len(distributions), figsize=(4 * len(distributions), 3.2), squeeze=False)
    for ax, (field, counts) in zip(axes[0], distributions.items(), strict=True):
        ax.bar([str(v) for v in counts.index], counts.values, color="tab:blue")
        ax.set(title=field, ylabel="answers")
        integer_axis(ax.yaxis)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## A few answers (text is escaped)

# %%
table(answers[answers.status == "completed"].head(5)[["custom_id", "finish_reason", "completion_tokens", "answer"]])
