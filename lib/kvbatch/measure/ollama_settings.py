"""Ollama's parallel slots and KV cache type are the server's settings (`OLLAMA_NUM_PARALLEL`, `OLLAMA_KV_CACHE_TYPE`
in the environment of `ollama serve`, often a system service), not kvbatch's: reading them from kvbatch's own
environment is wrong whenever Ollama runs as a service. Given (`--parallel`, `--kv-type`) they are taken as given;
otherwise they are inferred from what the server itself shows: `/api/ps` `size` at two `num_ctx` values gives the
cache's growth per token of `num_ctx`, which is the parallel slots times the architecture's per-slot figure for
the cache type (q8_0 about halves it). The result says where each setting came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbatch import defaults
from kvbatch.errors import UserInputError
from kvbatch.measure.kvmodel import KvArchitecture, KvCacheTypes, kv_cache
from kvbatch.serve.config import KV_CACHE_TYPES
from kvbatch.serve.layout import SlotLayout

OLLAMA_KV_TYPES = ("f16", "q8_0", "q4_0")
"""The cache types Ollama offers (OLLAMA_KV_CACHE_TYPE); f16 is its default, and preferred on a near tie."""


@dataclass
class OllamaSettings:
    kv_type: str
    parallel: int
    source: str
    """Where they came from, in words, for the plan."""
    slope_bytes_per_token: float | None = None
    """The measured growth of `/api/ps` `size` per token of `num_ctx`, when they were inferred."""

    @property
    def types(self) -> KvCacheTypes:
        return KvCacheTypes(self.kv_type, self.kv_type)


def predicted_slope(arch: KvArchitecture, kind: str, parallel: int, contexts: tuple[int, int]) -> float:
    """The cache's growth per token of `num_ctx` between two contexts, for `parallel` slots of type `kind`."""
    low, high = contexts
    types = KvCacheTypes(kind, kind)
    grow = kv_cache(arch, SlotLayout(parallel, high), types).cache_bytes
    return (grow - kv_cache(arch, SlotLayout(parallel, low), types).cache_bytes) / (high - low)


def closest_settings(arch: KvArchitecture, slope: float, contexts: tuple[int, int], *, kv_type: str | None,
                     parallel: int | None) -> tuple[str, int, float]:  # fmt: skip
    """The (type, slots) whose predicted slope is nearest the measured one, with its relative error. f16 and
    fewer slots win a near tie (q8_0 at twice the slots predicts 6 % more than f16: within the noise of a size)."""
    kinds = (kv_type,) if kv_type else OLLAMA_KV_TYPES
    counts = (parallel,) if parallel else range(1, defaults.MAX_SLOTS + 1)
    scored = []
    for kind in kinds:
        for count in counts:
            predicted = predicted_slope(arch, kind, count, contexts)
            if predicted > 0:
                scored.append((abs(slope / predicted - 1), kind, count))
    if not scored:
        raise UserInputError(f"{arch.architecture}: no KV cache grows with the context to compare with")
    best = min(error for error, _, _ in scored)
    near = [s for s in scored if s[0] <= best + defaults.OLLAMA_INFER_TIE]
    error, kind, count = min(near, key=lambda s: (OLLAMA_KV_TYPES.index(s[1]) if s[1] in OLLAMA_KV_TYPES else 9, s[2]))
    return kind, count, error


async def ollama_settings(backend, arch: KvArchitecture, *, kv_type: str | None, parallel: int | None,
                          trained_context: int | None = None) -> OllamaSettings:  # fmt: skip
    """The server's slots and cache type: as given, else inferred from its `/api/ps` sizes (loading the model at
    a second `num_ctx`: one reload, or two when it was not loaded)."""
    if kv_type is not None and kv_type not in KV_CACHE_TYPES:
        raise UserInputError(f"--kv-type {kv_type!r}: Ollama's are {', '.join(OLLAMA_KV_TYPES)}")
    if kv_type and parallel:
        return OllamaSettings(kv_type, parallel, f"--parallel {parallel} and --kv-type {kv_type}, as given")
    loaded = await backend.loaded()
    if loaded is None or not loaded.context_length:
        await backend.fill(1, context_tokens=defaults.OLLAMA_INFER_CONTEXT, max_tokens=1)
        loaded = await backend.loaded()
    if loaded is None or not loaded.context_length:
        raise UserInputError(f"Ollama does not list {backend.model} in /api/ps after a request; is it the right URL?")
    first = loaded.context_length
    ceiling = trained_context or 10**9
    again = None
    for second in (first * 4, first // 4, first * 2, first // 2):  # the widest span the server will load
        if not defaults.OLLAMA_INFER_MIN_CONTEXT <= second <= ceiling:
            continue
        await backend.fill(1, context_tokens=second, max_tokens=1)
        again = await backend.loaded()
        if again is not None and again.context_length == second:
            break
        again = None  # capped (OLLAMA_CONTEXT_LENGTH, the model's own limit): another size
    if again is None:
        raise UserInputError(
            f"Ollama loads {backend.model} only at num_ctx {first} here, so its slots and cache type cannot be "
            "inferred from its sizes; give --parallel and --kv-type"
        )
    contexts = (min(first, second), max(first, second))
    sizes = {first: loaded.size_bytes, second: again.size_bytes}
    slope = (sizes[contexts[1]] - sizes[contexts[0]]) / (contexts[1] - contexts[0])
    kind, count, error = closest_settings(arch, slope, contexts, kv_type=kv_type, parallel=parallel)
    measured = f"/api/ps size grows {slope / 1024:.2f} KiB per num_ctx token ({contexts[0]} -> {contexts[1]})"
    parts = [f"--kv-type {kv_type}" if kv_type else f"cache {kind} inferred",
             f"--parallel {parallel}" if parallel else f"{count} slot(s) inferred"]  # fmt: skip
    source = (f"{', '.join(parts)}: {measured}, {count} x {kind} predicts within {error:.0%} "
              "(give --parallel and --kv-type to state them)")  # fmt: skip
    return OllamaSettings(kind, count, source, slope)
