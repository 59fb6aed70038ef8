"""What a slot layout costs in memory, for the plan: the measured base, plus the architecture model of the whole
KV cache (global layers for every cell, sliding-window cells per slot as llama.cpp pads them), with the measured
slope in place of the predicted global-layer slope when a measurement exists, plus what the server takes only
once it serves: the context checkpoints (priced; their number is capped by `--ctx-checkpoints`), its compute
buffer, each slot's logits and sampler (`ServingMemory`). The plan is a bound on the run's peak, not on the memory
after load."""

from __future__ import annotations

from dataclasses import dataclass

from kvbatch import defaults
from kvbatch.measure.kvmodel import KvArchitecture, KvCacheTypes, kv_bytes_per_token, kv_cache
from kvbatch.measure.result import Measurement
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.log import ServerLog


@dataclass(frozen=True)
class MemoryBreakdown:
    base_bytes: float
    global_bytes: float
    sliding_bytes: float
    checkpoint_bytes: float
    checkpoints_in_budget: bool
    ctx_checkpoints: int = 0
    serving_bytes: float = 0.0
    """What the server takes beyond its base once it serves (compute buffer, logits and samplers; `ServingMemory`),
    as far as it counts against the budget."""

    @property
    def kv_cache_bytes(self) -> float:
        """The cache the server allocates at load (what its KV buffer log lines add up to)."""
        return self.global_bytes + self.sliding_bytes

    @property
    def counted_bytes(self) -> float:
        """What counts against the budget at the run's peak: base, cache, what serving adds, and the checkpoints
        when they share the budget's memory."""
        checkpoints = self.checkpoint_bytes if self.checkpoints_in_budget else 0
        return self.base_bytes + self.kv_cache_bytes + self.serving_bytes + checkpoints


@dataclass(frozen=True)
class ServingMemory:
    """What llama-server takes beyond the probe's base once it serves a layout, priced from the probe's own log.

    Measured on the 270M (4 slots x 3584, the shipped sample's plan): 418 MiB after load, 545 MiB at the peak, of
    which 90 MiB were checkpoints (priced apart) and the rest is this:
    - the compute buffer: allocated at load but touched only by the first request (the probe starts with
      `--no-warmup`, so its base holds none of it); it grows by the attention mask, `ubatch` x 2 bytes (f16) per
      cell of one slot's stream (20.28 MiB at 1 x 1024, 23.28 at 1 x 4096, 35.28 at 1 x 16384, 22.78 at 4 x 3584).
      On a GPU the device's compute buffer is allocated at load, so the base holds the probe's and only the growth
      is added;
    - the logits buffer: vocabulary x 4 bytes per slot, cleared at load (the probe's base holds one slot's);
    - each slot's sampler: a candidate array of vocabulary x 12 bytes (`llama_token_data`), filled per token;
    - `SERVING_ALLOWANCE_PER_SLOT_BYTES` (defaults) for what is left: the allocator's arenas of the HTTP threads
      and per-slot state, measured at 0.6-1.6 MiB per slot.

    - answers constrained by a JSON schema (when the batch asks for them): the grammar sampler's state, reached with
      the first answers and flat after (bench/json_soak.py: 163 MiB above the free-text plan at 1 slot, 167 at 4),
      priced per vocabulary entry once per server and a little per slot (`grammar_bytes`).
    """

    probe_compute_bytes: float
    """The compute buffers the probe logged, on the devices whose memory the budget is."""
    probe_stream_cells: int
    probe_slots: int = 1
    vocab_size: int = 0
    ubatch_tokens: int = defaults.UBATCH_TOKENS
    base_holds_compute: bool = False
    """The base was read where an allocation counts at once (a GPU): the probe's compute buffer is in it."""
    host_in_budget: bool = True
    """The budget is the host's memory (a CPU server): logits, samplers and the allowance count."""
    json_answers: bool = False
    """The batch asks for JSON answers: the server's grammar sampler state is priced (`grammar_bytes`)."""

    MASK_BYTES_PER_CELL = 2
    LOGIT_BYTES = 4
    SAMPLER_BYTES_PER_TOKEN = 12

    @classmethod
    def from_probe_log(cls, log: ServerLog, *, probe_context: int, on_gpu: bool,
                       ubatch_tokens: int = defaults.UBATCH_TOKENS) -> ServingMemory:  # fmt: skip
        """From the probe server's load lines (its compute buffers and vocabulary), at `probe_context` on 1 slot."""
        devices = {k: v for k, v in log.compute_buffer_bytes.items() if (k.startswith("CUDA") if on_gpu else True)}
        return cls(float(sum(devices.values())), probe_context, 1, log.vocab_size or 0, ubatch_tokens,
                   base_holds_compute=on_gpu, host_in_budget=not on_gpu)  # fmt: skip

    def compute_bytes(self, stream_cells: int) -> float:
        """The compute buffer at `stream_cells` per slot stream (what the budget must hold of it beyond the base)."""
        growth = self.ubatch_tokens * self.MASK_BYTES_PER_CELL * (stream_cells - self.probe_stream_cells)
        return max(growth, 0.0) + (0.0 if self.base_holds_compute else self.probe_compute_bytes)

    def per_slot_bytes(self) -> float:
        """Each slot's sampler and allowance, on the host."""
        return self.vocab_size * self.SAMPLER_BYTES_PER_TOKEN + defaults.SERVING_ALLOWANCE_PER_SLOT_BYTES

    def grammar_bytes(self, slots: int) -> float:
        """What answers constrained by a JSON schema add on the host (defaults.JSON_ANSWER_*), 0 for free text."""
        if not self.json_answers:
            return 0.0
        per_server = self.vocab_size * defaults.JSON_ANSWER_BYTES_PER_VOCAB_TOKEN
        return per_server + slots * defaults.JSON_ANSWER_BYTES_PER_SLOT

    def bytes_for(self, slots: int, stream_cells: int) -> float:
        host = 0.0
        if self.host_in_budget:
            extra_slots = max(slots - self.probe_slots, 0)
            host = extra_slots * self.vocab_size * self.LOGIT_BYTES + slots * self.per_slot_bytes()
            host += self.grammar_bytes(slots)
        return self.compute_bytes(stream_cells) + host


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
    serving: ServingMemory | None = None
    """What the server takes once it serves (None where the server's own figure already holds it: Ollama)."""
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
        stream_cells = cache.global_cells // max(cache.slots, 1) if not self.unified else cache.global_cells
        serving = self.serving.bytes_for(cache.slots, stream_cells) if self.serving else 0.0
        return MemoryBreakdown(self.base_bytes, global_bytes, cache.sliding_bytes, cache.checkpoint_bytes,
                               self.checkpoints_in_budget, self.ctx_checkpoints, serving)  # fmt: skip

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
