# %% [markdown]
# # KV-cache growth: memory vs allocated context, and memory vs tokens in use
# Sweep A loads the model at several context sizes and fits `memory = base + slope x context`; the slope is put
# beside what the model's architecture predicts. Sweep B keeps one allocation and fills it step by step.

# %% [parameters]
from kvbatch import defaults

backend = "embedded"  # "embedded" (llama-server started here) or "ollama" (a running Ollama at `url`)
url = None
model = None  # Ollama model name, e.g. "gemma3:12b"
model_path = None  # GGUF for the embedded server (default: Gemma 3 270M Q4_K_M)
kv_type = "f16"
parallel = 1  # Ollama's OLLAMA_NUM_PARALLEL (it allocates num_ctx x parallel)
contexts = [2048, 8192, 16384, 32768]
repeats = 2
swa_full_variants = [False, True]  # the sliding-window cache as shipped, and with --swa-full (embedded only)
fill_context = defaults.CONTEXT_TOKENS
fill_fractions = [0.1, 0.25, 0.5, 0.75, 0.95]
probe = "auto"
estimator_slots = [1, 4, 16]  # the verdict on the estimators: each swept context at these slot counts (embedded)
out_dir = str(defaults.MEASUREMENTS_DIR)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from kvbatch.measure import steps
from kvbatch.measure.kvmodel import KvCacheTypes
from kvbatch.measure.result import model_identity
from kvbatch.report.display import size, table
from kvbatch.serve.config import ServerConfig

arch = steps.architecture(backend, url=url, model=model, model_path=model_path)
identity = model_identity(backend, model, model_path)
display(Markdown(f"**Model** `{identity}`: {arch.block_count} layers ({len(arch.global_layers)} global), "
                 f"{arch.head_count_kv} KV heads x {arch.key_length}, sliding window {arch.sliding_window}, "
                 f"trained context {arch.context_length_trained}."))

# %%
runs = {}
for swa_full in (swa_full_variants if backend == "embedded" else [False]):
    types = KvCacheTypes(kv_type, kv_type, swa_full=swa_full)
    config = ServerConfig(model_path=Path(model_path) if model_path else None, cache_type_k=kv_type,
                          cache_type_v=kv_type, swa_full=swa_full)
    out = steps.result_file(backend, model, model_path, types, out_dir)
    loader = steps.make_loader(backend, url=url, model=model, config=config, probe=probe, parallel=parallel,
                               measurement=out)
    try:
        runs[swa_full] = steps.kv_growth(loader, arch, types, contexts, repeats, fill_context, fill_fractions, out,
                                         backend=backend, model=identity, parallel=parallel)
    finally:
        loader.close()
    runs[swa_full]["out"] = out

# %%
first = next(iter(runs.values()))["result"]
flags = ", ".join(f"{k}={v}" for k, v in first.server_flags.items() if v is not None and k != "instruction_sets")
display(Markdown(f"**Server**: {first.build.get('build', 'Ollama at ' + str(url))}; {flags}. Probe: `{first.probe}`."))

# %% [markdown]
# ## Sweep A: memory vs allocated context

# %%
fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
rows = []
for ax, (swa_full, run) in zip(axes[0], runs.items()):
    points, fit = run["points_allocated"], run["fit"]
    missing = sorted(set(points.loc[~points["fits"], "context_tokens"]))
    points = points[points["fits"]]
    x = np.linspace(0, max(contexts) * 1.05, 50)
    ax.plot(points["context_tokens"], points["used_bytes"] / 2**20, "o", label=f"measured ({points['probe'].iloc[0]})")
    for i, context in enumerate(missing):
        ax.axvline(context, color="tab:red", ls=":", label="does not fit" if i == 0 else None)
    ax.plot(x, fit.predict(x) / 2**20, "-", label=f"fit: {fit.slope_bytes_per_token / 1024:.2f} KiB/token")
    ax.plot(x, (fit.base_bytes + run["predicted_slope"] * x) / 2**20, "--",
            label=f"architecture: {run['predicted_slope'] / 1024:.2f} KiB/token")
    ax.set(title=("--swa-full" if swa_full else "sliding window") + ": memory after load",
           xlabel="allocated context (tokens)", ylabel="MiB")
    ax.legend()
    low, high = fit.slope_ci95
    log_fit = run["fits"].get("kv_log_bytes")
    rows.append({"configuration": "--swa-full" if swa_full else "sliding window",
                 "measured KiB/token": f"{fit.slope_bytes_per_token / 1024:.3f}",
                 "95% CI": f"{low / 1024:.3f} .. {high / 1024:.3f}",
                 "predicted KiB/token": f"{run['predicted_slope'] / 1024:.3f}",
                 "measured vs predicted": f"{fit.slope_bytes_per_token / run['predicted_slope'] - 1:+.1%}",
                 "base": size(fit.base_bytes), "R²": f"{fit.r_squared:.5f}",
                 "repeats agree within": f"{run['spread']:.2%}",
                 "KV from server log KiB/token": f"{log_fit.slope_bytes_per_token / 1024:.3f}" if log_fit else "–"})
fig.tight_layout()
display(table(pd.DataFrame(rows)))
unmeasured = [(swa_full, n) for swa_full, run in runs.items() for n in run["result"].not_measured]
if unmeasured:
    display(Markdown("**Not measured** (a result: the fit uses the points that fit):"))
    display(table(pd.DataFrame([{
        "configuration": "--swa-full" if swa_full else "sliding window", "context": f"{n.context_tokens:,}",
        "fill": f"{n.tokens:,} tokens" if n.tokens else "–", "result": n.what, "reason": n.reason,
    } for swa_full, n in unmeasured])))

# %% [markdown]
# ## The verdict on the estimators
# What each tool would have predicted for this very model, beside what the server allocated (its own KV buffer
# lines) and what it held after load: kvbatch's whole-cache model, the line measured above (at one slot),
# `llama-fit-params` run on the same file (its `model + context + compute`), Ollama's rule written from its source
# (`GraphSize`: its KV part, beside the server's base), and the naive rule the seed used (every layer x the context).

# %%
from kvbatch.measure import estimators as E

sliding = next(iter(runs.values()))
fit_line = (sliding["fit"].base_bytes, sliding["fit"].slope_bytes_per_token)  # the embedded sweep runs one slot
if backend == "embedded":
    from kvbatch.serve.server import default_model_path

    gguf_path = Path(model_path) if model_path else default_model_path()
    verdict = steps.estimator_verdict(gguf_path, arch, KvCacheTypes(kv_type, kv_type), contexts, estimator_slots,
                                      sliding["out"], backend=backend, model=identity, fit_line=fit_line)
    frame = pd.DataFrame([r.as_dict() for r in verdict["rows"]])
    seen = {(o.context, o.slots): o for o in verdict["observed"]}
    shown = pd.DataFrame({
        "context x slots": [f"{r.context:,} x {r.slots}" for r in verdict["rows"]],
        "server KV (log)": [size(seen[(r.context, r.slots)].kv_log_bytes) for r in verdict["rows"]],
        "server after load": [size(seen[(r.context, r.slots)].after_load_bytes) for r in verdict["rows"]],
        "estimator": frame["estimator"],
        "its KV": [size(v) if pd.notna(v) else "–" for v in frame["kv_bytes"]],
        "KV error": [f"{v:+.1%}" if pd.notna(v) else "–" for v in frame["kv_error"]],
        "its memory": [size(v) if pd.notna(v) else "–" for v in frame["total_bytes"]],
        "memory error": [f"{v:+.1%}" if pd.notna(v) else "–" for v in frame["total_error"]],
    })
    slot_counts = sorted({o.slots for o in verdict["observed"]})
    fig, axes = plt.subplots(1, len(slot_counts), figsize=(5.2 * len(slot_counts), 3.8), squeeze=False)
    for ax, slots in zip(axes[0], slot_counts, strict=True):
        mine = frame[frame.slots == slots]
        for name in E.ESTIMATORS:
            line = mine[mine.estimator == name].sort_values("context")
            if not line.empty and line["total_bytes"].notna().any():
                ax.plot(line["context"], line["total_bytes"] / 2**20, "-", label=name)
        points = sorted((o.context, o.after_load_bytes) for o in verdict["observed"] if o.slots == slots)
        ax.plot([c for c, _ in points], [m / 2**20 for _, m in points], "ko", label="server after load")
        ax.set(title=f"{slots} slot(s)", xlabel="context (tokens, all slots)", ylabel="MiB")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    plt.show()
    display(table(shown))
    display(Markdown("\n".join(f"- {sentence}" for sentence in verdict["sentences"].values())
                     + ("" if verdict["fit_params"] else "\n- llama-fit-params: not found beside llama-server.")))
else:  # Ollama: its own /api/ps size at each num_ctx, beside its rule's KV and kvbatch's model of the cache
    fitted = sliding["points_allocated"]
    points = fitted[fitted["fits"]].groupby("context_tokens")["used_bytes"].median()
    types = KvCacheTypes(kv_type, kv_type)
    display(table(pd.DataFrame({
        "num_ctx": [f"{c:,}" for c in points.index],
        "/api/ps size": [size(v) for v in points.values],
        "Ollama's rule (KV)": [size(E.ollama_kv_bytes(arch, types, c, parallel)) for c in points.index],
        "kvbatch (KV)": [size(E.kvbatch_kv_bytes(arch, types, c * parallel, parallel)) for c in points.index],
        "naive (KV)": [size(E.naive_kv_bytes(arch, types, c * parallel, parallel)) for c in points.index],
        "/api/ps growth from the first num_ctx": [size(v - points.values[0]) for v in points.values],
        "Ollama's rule, growth": [size(E.ollama_kv_bytes(arch, types, c, parallel)
                                       - E.ollama_kv_bytes(arch, types, points.index[0], parallel))
                                  for c in points.index],
    })))

# %% [markdown]
# ### What the fit flags

# %%
flags = [f"- **{'--swa-full' if swa_full else 'sliding window'}**: {note}"
         for swa_full, run in runs.items() for note in run["findings"]]
display(Markdown("\n".join(flags) if flags else "Nothing: repeats agree within 2 %, R² is above 0.99, no point is an "
                 "outlier, and the slope is within 10 % of the architecture's prediction."))

# %% [markdown]
# ## Sweep B: memory vs tokens actually in use (one allocation)

# %%
fig, ax = plt.subplots(figsize=(7, 3.8))
for swa_full, run in runs.items():
    points = run["points_in_use"]
    points = points[points["fits"]].sort_values("tokens_in_use")
    ax.plot(points["tokens_in_use"], points["used_bytes"] / 2**20, "o-",
            label="--swa-full" if swa_full else "sliding window")
ax.set(title=f"Memory while filling a {fill_context}-token context", xlabel="tokens in use", ylabel="MiB")
ax.set_ylim(bottom=0)
ax.legend()
for swa_full, run in runs.items():
    points = run["points_in_use"]
    points = points[points["fits"]]
    if len(points) < 2:
        display(Markdown(f"**{'--swa-full' if swa_full else 'sliding window'}:** {fill_context} tokens could not be "
                         "filled step by step: see *Not measured* above."))
        continue
    growth = float(points["used_bytes"].iloc[-1] - points["used_bytes"].iloc[0])
    display(Markdown(
        f"**{'--swa-full' if swa_full else 'sliding window'}:** filling {int(points['tokens_in_use'].max())} of "
        f"{fill_context} tokens changed memory by **{growth / 2**20:+.1f} MiB**, while allocating the same "
        f"{fill_context} tokens costs {run['fit'].slope_bytes_per_token * fill_context / 2**20:.1f} MiB."))

# %% [markdown]
# **Why "0 MB per token".** The server allocates the whole KV cache when the model loads, for the full context
# (times the parallel slots), and clears it then. Memory therefore grows with the *allocated* context (sweep A),
# not with the tokens in use (sweep B): a conversation that grows inside a loaded context adds nothing you can
# see. The way to spend less memory is a smaller allocation; the way to spend fewer prompt tokens is the prefix
# cache, not cramming requests into one conversation.
#
# What little does grow while a sliding-window model fills its context is not the KV cache: llama-server saves
# *context checkpoints* of the sliding-window cache while it processes a long prompt, so that a later request can
# reuse a prefix. Each is a copy of one slot's window (7.5 MiB for Gemma 3 270M, 320 MiB for the 12B). kvbatch
# caps them at 3 per slot (`--ctx-checkpoints`; the server's own default is 32) and the plan prices them.
# With `--swa-full` no checkpoint is needed and the line is flat.
