"""What a slot layout costs in memory, for the plan: the measured base, plus the architecture model of the whole
KV cache (global layers for every cell, sliding-window cells per slot as llama.cpp pads them), with the measured
slope in place of the predicted global-layer slope when a measurement exists, plus the context checkpoints the
server keeps while serving (priced; their number is capped by `--ctx-checkpoints`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvbatch import defaults
from kvbatch.measure.kvmodel import KvArchitecture, KvCacheTypes, kv_bytes_per_token, kv_cache
from kvbatch.measure.result import Measurement
from kvbatch.serve.layout import SlotLayout


@dataclass(frozen=True)
class MemoryBreakdown:
    base_bytes: float
    global_bytes: float
    sliding_bytes: float
    checkpoint_bytes: float
    checkpoints_in_budget: bool
    ctx_checkpoints: int = 0

    @property
    def kv_cache_bytes(self) -> float:
        """The cache the server allocates at load (what its KV buffer log lines add up to)."""
        return self.global_bytes + self.sliding_bytes

    @property
    def counted_bytes(self) -> float:
        """What counts against the budget: base, cache, and the checkpoints when they share its memory."""
        return self.base_bytes + self.kv_cache_bytes + (self.checkpoint_bytes if self.checkpoints_in_budget else 0)


@dataclass
class MemoryModel:
    """base + cache(layout): the base holds no KV at all (weights, fixed buffers); the cache is modelled whole."""

    arch: KvArchitecture
    base_bytes: float
    types: KvCacheTypes
    measured_slope: float | None = None
    """Measured bytes per token of total context, for `measured_types`; replaces the predicted global slope."""
    measured_types: KvCacheTypes | None = None
    unified: bool = False
    ubatch_tokens: int = defaults.UBATCH_TOKENS
    ctx_checkpoints: int = defaults.CTX_CHECKPOINTS
    checkpoints_in_budget: bool = True
    """On a CPU the checkpoints take the same RAM as the cache; on a GPU they live in host memory."""
    source: str = ""

    def slope(self, types: KvCacheTypes) -> float:
        """Bytes per token of total context for the global layers (and anything else that grows with context)."""
        predicted = kv_bytes_per_token(self.arch, types)
        if self.measured_slope is None or self.measured_types is None:
            return predicted
        measured_for = kv_bytes_per_token(self.arch, self.measured_types)
        return self.measured_slope * (predicted / measured_for if measured_for else 1.0)

    def breakdown(self, layout: SlotLayout, types: KvCacheTypes | None = None) -> MemoryBreakdown:
        types = types or self.types
        cache = kv_cache(self.arch, layout, types, unified=self.unified, ubatch_tokens=self.ubatch_tokens,
                         ctx_checkpoints=self.ctx_checkpoints)  # fmt: skip
        predicted_global = kv_bytes_per_token(self.arch, types) * cache.global_cells
        global_bytes = cache.global_bytes * (self.slope(types) * cache.global_cells / predicted_global) \
            if predicted_global else cache.global_bytes  # fmt: skip
        return MemoryBreakdown(self.base_bytes, global_bytes, cache.sliding_bytes, cache.checkpoint_bytes,
                               self.checkpoints_in_budget, self.ctx_checkpoints)  # fmt: skip

    @classmethod
    def from_measurement(cls, arch: KvArchitecture, measurement: Measurement, types: KvCacheTypes, **options):
        """The measured line is memory = intercept + slope x context at `parallel_slots` slots; its intercept holds
        those slots' window caches, which the model adds back per slot, so they come off the base here."""
        parallel = max(measurement.parallel_slots, 1)
        big = SlotLayout(parallel, max(measurement.contexts or [8192]))
        window = kv_cache(
            arch, big, measurement.types, ubatch_tokens=options.get("ubatch_tokens", defaults.UBATCH_TOKENS)
        )
        return cls(
            arch=arch,
            base_bytes=float(measurement.base_bytes or 0.0) - window.sliding_bytes,
            types=types,
            measured_slope=float(measurement.kv_bytes_per_token or 0.0) / parallel or None,
            measured_types=measurement.types,
            source=f"measured base and slope ({measurement.kv_bytes_per_token / parallel / 1024:.2f} KiB/token)",
            **options,
        )
