"""Planning: slots, per-slot context, KV cache type and conversation chunk size, from the memory model (measured
base and slope, the architecture's whole cache), the budget, and the real token sizes of the prompts.

The plan is a pure function of its inputs, so it is re-made whenever the prompts or the limits change, and it is
printed (and written as plan.json) before any request. The plan's `SlotLayout` is what it planned, a value: the
servers' supervisors hold the layouts they run with (a back-off replaces theirs), and the run reads those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvbatch import defaults
from kvbatch.batch.inputs.sizes import SizeProfile
from kvbatch.batch.plan.memory import MemoryBreakdown, MemoryModel
from kvbatch.batch.plan.plan_record import MemoryRecord, PlanRecord
from kvbatch.errors import UserInputError
from kvbatch.measure.budget import Budget
from kvbatch.measure.kvmodel import KvCacheTypes
from kvbatch.serve.backends import ServerLimits
from kvbatch.serve.layout import SlotLayout
from kvbatch.units import format_bytes

MODES = ("independent", "conversation")


class PlanError(UserInputError):
    """No plan can run this input under these limits (e.g. the largest request cannot fit)."""


@dataclass
class PlanInputs:
    """Everything the planner decides from, besides the sizes."""

    memory: MemoryModel | None = None
    """None for a server whose memory is not ours to model (an external OpenAI-compatible server)."""
    budget: Budget | None = None
    margin: float = defaults.SAFETY_MARGIN
    server_limits: ServerLimits | None = None
    trained_context_tokens: int | None = None
    fixed_slots: int | None = None
    """Slots the server decides, not us (Ollama's OLLAMA_NUM_PARALLEL)."""
    kv_types: tuple[KvCacheTypes, ...] = (KvCacheTypes(),)
    """Candidates: one for a given type, several for `--kv-type auto`."""
    kv_type_is_ours: bool = True
    """False when the server's own setting decides the type (Ollama's OLLAMA_KV_CACHE_TYPE)."""
    sustained_rate: tuple[int, int, float] | None = None
    """(slots, per-slot context, requests/s) measured by a sustained load: the estimate for that same layout."""
    seconds_per_prompt_token: float | None = None
    seconds_per_answer_token: float | None = None
    speeds_source: str = "measured token speeds"
    """Where the token speeds came from: the measurement, or the probe server's one timed request."""
    slots_speed_up: bool = True
    """Whether parallel slots serve faster than one (a GPU batches them); False on a CPU, whose cores the slots
    share: the estimate then does not divide by the slots."""
    limits_source: str = ""
    measurement_file: str | None = None
    measurement_reason: str | None = None
    measured_budget: str | None = None
    """The budget the measurement was taken under, when it differs from this plan's."""


@dataclass
class Plan:
    """What the executor will do, and what it expects to cost and save."""

    mode: str
    layout: SlotLayout
    sizes: SizeProfile
    kv_types: KvCacheTypes
    memory: MemoryBreakdown | None
    budget: Budget | None
    margin: float
    prompt_tokens_without_cache: int
    prompt_tokens_evaluated: int
    estimated_seconds: float | None
    estimate_basis: str
    limits_source: str
    measurement_file: str | None
    measurement_reason: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def request_count(self) -> int:
        return self.sizes.request_count

    @property
    def chunk_size(self) -> int:
        """Requests per conversation (conversation mode) at the planned per-slot context."""
        return self.chunk_size_at(self.layout.slot_context_tokens)

    def chunk_size_at(self, slot_context_tokens: int) -> int:
        """Requests per conversation at a per-slot context: a back-off that shrinks the context shortens chunks."""
        return self.sizes.conversation_turns(slot_context_tokens) if self.mode == "conversation" else 1

    @property
    def prompt_tokens_saved_share(self) -> float:
        without = self.prompt_tokens_without_cache
        return 1 - self.prompt_tokens_evaluated / without if without else 0.0

    def record(self) -> PlanRecord:
        memory = self.memory
        return PlanRecord(
            mode=self.mode,
            request_count=self.request_count,
            system_prompt_tokens=self.sizes.system_prompt_tokens,
            request_tokens_p99=self.sizes.request_tokens_p99,
            slot_context_tokens=self.layout.slot_context_tokens,
            parallel_slots=self.layout.slots,
            total_context_tokens=self.layout.total_context_tokens,
            chunk_size=self.chunk_size,
            kv_cache_type=self.kv_types.label,
            kv_cache_bytes=int(memory.kv_cache_bytes) if memory else None,
            memory=MemoryRecord(
                base_bytes=int(memory.base_bytes),
                global_kv_bytes=int(memory.global_bytes),
                sliding_kv_bytes=int(memory.sliding_bytes),
                checkpoint_bytes=int(memory.checkpoint_bytes),
                checkpoints_counted_in_budget=memory.checkpoints_in_budget,
                serving_bytes=int(memory.serving_bytes),
                total_bytes=int(memory.counted_bytes),
            )
            if memory
            else None,
            budget_bytes=self.budget.bytes if self.budget else None,
            budget=self.budget.text if self.budget else None,
            safety_margin=self.margin,
            prompt_tokens_without_cache=self.prompt_tokens_without_cache,
            prompt_tokens_evaluated=self.prompt_tokens_evaluated,
            prompt_tokens_saved_share=self.prompt_tokens_saved_share,
            estimated_seconds=self.estimated_seconds,
            estimate_basis=self.estimate_basis,
            limits_source=self.limits_source,
            token_source=self.sizes.token_source,
            chars_per_token=self.sizes.chars_per_token,
            measurement_file=self.measurement_file,
            measurement_reason=self.measurement_reason,
            notes=self.notes,
        )

    def describe(self) -> str:
        sizes = self.sizes
        minutes = _duration(self.estimated_seconds)
        lines = [
            f"plan ({self.mode} mode) for {self.request_count:,} requests",
            f"  system prompt: {sizes.system_prompt_tokens} tokens; largest request (p99): "
            f"{sizes.request_tokens_p99} tokens incl. answer [{sizes.token_source}]",
            f"  server: {self.layout.describe()} = {self.layout.total_context_tokens} context, "
            f"KV cache {self.kv_types.label} [{self.limits_source}]",
        ]
        if self.memory:
            memory = self.memory
            checkpoints = (
                f" + checkpoints {format_bytes(memory.checkpoint_bytes)} "
                f"(<= {memory.ctx_checkpoints}/slot, {'counted' if memory.checkpoints_in_budget else 'host RAM'})"
                if memory.checkpoint_bytes
                else ""
            )
            grammar = " (with the grammar of the JSON answers)" if self.sizes.json_answers else ""
            serving = f" + serving {format_bytes(memory.serving_bytes)}{grammar}" if memory.serving_bytes else ""
            lines.append(
                f"  memory: base {format_bytes(memory.base_bytes)} + KV cache {format_bytes(memory.kv_cache_bytes)} "
                f"(global {format_bytes(memory.global_bytes)}, sliding window {format_bytes(memory.sliding_bytes)})"
                f"{checkpoints}{serving} = {format_bytes(memory.counted_bytes)} at the peak"
            )
        if self.budget:
            lines.append(
                f"  budget: {self.budget.text}; the cache may use {self.margin:.0%} of the room above the base"
            )
        if self.mode == "conversation":
            lines.append(f"  conversation chunk: {self.chunk_size} requests per conversation")
        lines.append(
            f"  prompt tokens evaluated: {self.prompt_tokens_evaluated:,} of {self.prompt_tokens_without_cache:,} "
            f"without cache ({self.prompt_tokens_saved_share:.1%} saved); estimated time: {minutes} "
            f"[{self.estimate_basis}]"
        )
        lines.append(f"  measurement: {self.measurement_file or 'none'}"
                     + (f" ({self.measurement_reason})" if self.measurement_reason else ""))  # fmt: skip
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def align_context(tokens: float) -> int:
    align = defaults.CONTEXT_ALIGN_TOKENS
    return int(math.ceil(tokens / align) * align)


def _fits(inputs: PlanInputs, layout: SlotLayout, types: KvCacheTypes) -> tuple[bool, MemoryBreakdown | None]:
    """The cache (and what grows with it) may use `margin` of the budget's room above the base."""
    if inputs.memory is None or inputs.budget is None:
        return True, None
    memory = inputs.memory.breakdown(layout, types)
    room = inputs.budget.bytes - memory.base_bytes
    return memory.counted_bytes - memory.base_bytes <= inputs.margin * room, memory


def _most_slots(inputs: PlanInputs, slot_context: int, types: KvCacheTypes, most: int) -> tuple[int, MemoryBreakdown]:
    """The most slots of `slot_context` that fit (0 when not even one does), with that layout's memory."""
    best, best_memory = 0, None
    for slots in range(1, most + 1):
        fits, memory = _fits(inputs, SlotLayout(slots, slot_context), types)
        if not fits:
            break
        best, best_memory = slots, memory
    return best, best_memory


def _largest_context(inputs: PlanInputs, types: KvCacheTypes, slots: int, ceiling: int) -> int:
    """The largest per-slot context on the 256 grid that fits `slots` slots (0 when none does)."""
    align = defaults.CONTEXT_ALIGN_TOKENS
    low, high = 0, ceiling // align
    while low < high:
        middle = (low + high + 1) // 2
        if _fits(inputs, SlotLayout(slots, middle * align), types)[0]:
            low = middle
        else:
            high = middle - 1
    return low * align


def make_plan(
    sizes: SizeProfile,
    inputs: PlanInputs,
    *,
    mode: str = "independent",
    max_slots: int = defaults.MAX_SLOTS,
    requested_slots: int | None = None,
    requested_context: int | None = None,
) -> Plan:
    """Fit the requests into what the server can hold.

    independent: each slot holds the system prompt, the p99 request and its answer; as many slots as the memory
    allows (at most `max_slots`), with the KV cache type that fits the most. conversation: one slot as large as
    allowed, and as many requests per conversation as fit after the system prompt.
    """
    if mode not in MODES:
        raise PlanError(f"unknown mode {mode!r}; use independent or conversation")
    notes: list[str] = []
    limits = inputs.server_limits
    ceiling = inputs.trained_context_tokens or 10**9
    if limits and limits.max_model_len:
        ceiling = min(ceiling, limits.max_model_len)
    if sizes.longest_request_tokens > ceiling and not requested_context:
        raise PlanError(
            f"the largest request, {sizes.longest_request_id!r}, needs about {sizes.longest_request_tokens} tokens "
            f"(system prompt, message and max_tokens), but at most {ceiling} fit one slot (the model's context); "
            "shorten it or lower its max_tokens"
        )
    wanted = align_context(max(sizes.request_tokens_p99, sizes.longest_request_tokens) * defaults.CONTEXT_HEADROOM)
    wanted = min(wanted, ceiling - ceiling % defaults.CONTEXT_ALIGN_TOKENS or ceiling)
    slot_cap = min(max_slots, max(math.ceil(sizes.request_count / defaults.MIN_REQUESTS_PER_SLOT), 1))
    kv_types = inputs.kv_types[0]
    memory = None

    if limits and limits.slot_context_tokens and inputs.memory is None:
        # An external server's own layout: discovered, not ours to change.
        slot_context = limits.slot_context_tokens
        slots = requested_slots or limits.slots or 1
        if limits.slots and requested_slots and requested_slots > limits.slots:
            notes.append(f"{requested_slots} in flight asked for; the server has {limits.slots} slots")
        if sizes.longest_request_tokens > slot_context:
            notes.append(
                f"the largest request, {sizes.longest_request_id!r}, needs about {sizes.longest_request_tokens} "
                f"tokens, more than the server's {slot_context} per slot: requests that do not fit fail alone"
            )
    elif mode == "conversation":
        slots = requested_slots or 1
        slot_context = requested_context or _largest_context(inputs, kv_types, slots, min(ceiling, 131072))
        if inputs.memory is None:
            slot_context = requested_context or min(ceiling, 32768)
        _, memory = _fits(inputs, SlotLayout(slots, slot_context), kv_types)
    else:
        slot_context = requested_context or wanted
        if requested_context and sizes.longest_request_tokens > requested_context:
            notes.append(
                f"the largest request, {sizes.longest_request_id!r}, needs about {sizes.longest_request_tokens} "
                f"tokens, more than the {requested_context} asked for: requests that do not fit fail alone, into "
                "errors.jsonl"
            )
        if inputs.fixed_slots:
            slots = inputs.fixed_slots
            fits, memory = _fits(inputs, SlotLayout(slots, slot_context), kv_types)
            best, _ = _most_slots(inputs, slot_context, kv_types, defaults.MAX_SLOTS)
            if not fits and not requested_context:
                raise PlanError(_no_fit(sizes, inputs, slot_context, kv_types, slots))
            if best != slots:
                notes.append(
                    f"the server's {slots} parallel slot(s) are set on the server (OLLAMA_NUM_PARALLEL); "
                    f"{best} slot(s) of {slot_context} tokens would fit this budget"
                )
        else:
            choices = []
            for candidate in inputs.kv_types:
                count, candidate_memory = _most_slots(inputs, slot_context, candidate, slot_cap)
                choices.append((count, candidate, candidate_memory))
            slots, kv_types, memory = max(choices, key=lambda choice: choice[0])  # ties keep the first (f16)
            if len(inputs.kv_types) > 1:
                compared = ", ".join(f"{t.label}: {n} slot(s)" for n, t, _ in choices)
                notes.append(f"KV cache type chosen by the most slots that fit ({compared})")
            if slots == 0:
                if requested_context:
                    slots = 1
                    _, memory = _fits(inputs, SlotLayout(1, slot_context), kv_types)
                    notes.append("the context asked for does not fit the budget; out-of-memory recovery will shrink it")
                else:
                    raise PlanError(_no_fit(sizes, inputs, slot_context, kv_types, 1))
            if requested_slots:
                if requested_slots > slots:
                    notes.append(f"{requested_slots} slots asked for, but only {slots} fit the budget")
                slots = requested_slots
                _, memory = _fits(inputs, SlotLayout(slots, slot_context), kv_types)
        if not inputs.kv_type_is_ours and len(inputs.kv_types) == 1 and kv_types.k == "f16" and memory:
            notes.append("a q8_0 KV cache (OLLAMA_KV_CACHE_TYPE=q8_0, with flash attention) would halve the cache")

    layout = SlotLayout(slots, slot_context)
    chunk_size = sizes.conversation_turns(slot_context) if mode == "conversation" else 1
    evaluated, without_cache = _prompt_tokens(sizes, mode, slots, chunk_size)
    estimate, basis = _estimate(sizes, inputs, mode, slots)
    if inputs.budget and inputs.measured_budget:
        notes.append(
            f"measured under {inputs.measured_budget}; planned for {inputs.budget.text}: the safe context is "
            "re-derived from the measured base and slope for this budget"
        )
    return Plan(
        mode=mode,
        layout=layout,
        sizes=sizes,
        kv_types=kv_types,
        memory=memory,
        budget=inputs.budget,
        margin=inputs.margin,
        prompt_tokens_without_cache=without_cache,
        prompt_tokens_evaluated=evaluated,
        estimated_seconds=estimate,
        estimate_basis=basis,
        limits_source=inputs.limits_source or (limits.describe() if limits else "assumed"),
        measurement_file=inputs.measurement_file,
        measurement_reason=inputs.measurement_reason,
        notes=notes,
    )


def least_slot_context(sizes: SizeProfile, slot_context: int) -> int:
    """The smallest per-slot context an out-of-memory back-off may shrink to: what the largest request needs."""
    return min(align_context(sizes.longest_request_tokens * defaults.CONTEXT_HEADROOM), slot_context)


def _no_fit(sizes: SizeProfile, inputs: PlanInputs, slot_context: int, types: KvCacheTypes, slots: int) -> str:
    largest = _largest_context(inputs, types, slots, 10**7)
    budget = inputs.budget.text if inputs.budget else "the budget"
    return (
        f"the largest request, {sizes.longest_request_id!r}, needs about {sizes.longest_request_tokens} tokens "
        f"(a {slot_context}-token slot), but at most {largest} fit one slot ({budget}, {slots} slot(s))"
        f" with a {types.label} cache; shorten it, lower its max_tokens, use --kv-type q8_0, or raise --memory-budget"
    )


def _prompt_tokens(sizes: SizeProfile, mode: str, slots: int, chunk_size: int) -> tuple[int, int]:
    n = sizes.request_count
    user_mean = sizes.user_tokens_p50
    without_cache = n * (sizes.system_prompt_tokens + user_mean)
    if mode == "independent":
        evaluated = n * user_mean + sizes.system_prompt_tokens * slots * sizes.prefix_count
    else:
        chunks = math.ceil(n / chunk_size) if n else 0
        evaluated = chunks * sizes.system_prompt_tokens + n * (user_mean + int(sizes.max_tokens_mean))
    return (min(evaluated, without_cache) if without_cache else 0), without_cache


def _estimate(sizes: SizeProfile, inputs: PlanInputs, mode: str, slots: int) -> tuple[float | None, str]:
    """From a throughput measured at a plan where there is one; else from single-request speeds, divided by the
    slots (an upper bound on the speed-up, so a rough figure). The run re-makes it from its own rate."""
    n = sizes.request_count
    if inputs.sustained_rate and inputs.sustained_rate[0] == slots and inputs.sustained_rate[2]:
        return n / inputs.sustained_rate[2], "the sustained-load throughput at this layout"
    if inputs.seconds_per_prompt_token and inputs.seconds_per_answer_token:
        per_request = (sizes.user_tokens_p50 * inputs.seconds_per_prompt_token
                       + sizes.max_tokens_mean * inputs.seconds_per_answer_token)  # fmt: skip
        parallel = slots if mode == "independent" and inputs.slots_speed_up else 1
        estimate = n * per_request / parallel
        estimate += sizes.system_prompt_tokens * inputs.seconds_per_prompt_token * sizes.prefix_count * slots
        shared = "" if inputs.slots_speed_up else ", the slots sharing the CPU's cores"
        return estimate, (f"{inputs.speeds_source}{shared}: rough (answers taken at max_tokens), re-made from the "
                          "run's own rate")
    return None, "no speeds measured; the run estimates from its own rate"
