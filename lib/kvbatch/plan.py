"""Planning: chunk size, per-slot context and parallel slots from measured limits and the real prompt sizes.

The plan is a pure function of its inputs (limits, token counts, size distribution), so it is re-made
whenever the system prompt or the sizes change, and it can be printed and checked before any request.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvbatch.errors import UserInputError

CONTEXT_ALIGN_TOKENS = 256
CHAT_TEMPLATE_TOKENS_PER_MESSAGE = 8
"""Role markers and separators the chat template adds per message (Gemma: <start_of_turn>user\\n ... <end_of_turn>)."""


MEASUREMENTS_DIR = Path("data/measurements")


def variant_name(config) -> str:
    """The KV configuration a measurement belongs to: cache types, and whether --swa-full was on."""
    return f"{config.cache_type_k}-{config.cache_type_v}{'-swafull' if config.swa_full else ''}"


def result_path(model: str, config, directory: Path = MEASUREMENTS_DIR) -> Path:
    """Where `make measure` writes, and planning looks, for a model and KV configuration."""
    return directory / f"{Path(model).stem}__{variant_name(config)}.json"


class PlanError(UserInputError):
    """No plan can run this input under these limits (e.g. the largest request cannot fit)."""


@dataclass
class Limits:
    """What the server can hold: from `make measure` (measured) or from the architecture plus a quick probe."""

    safe_context_tokens: int
    kv_bytes_per_token: float
    base_bytes: float
    budget_bytes: float | None
    trained_context_tokens: int | None
    source: str

    @classmethod
    def from_measurement_file(cls, path: Path) -> Limits | None:
        """The limits `make measure` wrote, or None when the file lacks a fit or a safe context."""
        data = json.loads(Path(path).read_text("utf-8"))
        fit = data.get("fit") or {}
        safe = data.get("safe_context") or {}
        if not fit.get("slope_bytes_per_token") or not safe.get("safe_context_tokens"):
            return None
        return cls(
            safe_context_tokens=int(safe["safe_context_tokens"]),
            kv_bytes_per_token=float(fit["slope_bytes_per_token"]),
            base_bytes=float(fit.get("base_bytes") or 0.0),
            budget_bytes=safe.get("budget_bytes"),
            trained_context_tokens=data.get("trained_context_tokens"),
            source=f"measured, {path}",
        )


@dataclass
class SizeProfile:
    """Token sizes of the batch, from the input scan and the server's tokenizer (or a calibrated estimate)."""

    request_count: int
    system_prompt_tokens: int
    prefix_count: int
    user_tokens_p50: int
    user_tokens_p99: int
    max_tokens_p99: int
    max_tokens_mean: float
    longest_request_id: str
    longest_request_tokens: int
    chars_per_token: float
    token_source: str


@dataclass
class Plan:
    """What the executor will do, and what it expects to save."""

    mode: str
    request_count: int
    system_prompt_tokens: int
    request_tokens_p99: int
    slot_context_tokens: int
    parallel_slots: int
    total_context_tokens: int
    chunk_size: int
    predicted_kv_bytes: float
    prompt_tokens_without_cache: int
    prompt_tokens_evaluated: int
    prompt_tokens_saved_share: float
    estimated_seconds: float | None
    limits_source: str
    token_source: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        minutes = f"{self.estimated_seconds / 60:.1f} min" if self.estimated_seconds else "unknown"
        lines = [
            f"plan ({self.mode} mode) for {self.request_count} requests",
            f"  system prompt: {self.system_prompt_tokens} tokens; largest request (p99): {self.request_tokens_p99} "
            f"tokens incl. answer [{self.token_source}]",
            f"  server: {self.parallel_slots} slot(s) x {self.slot_context_tokens} tokens = "
            f"{self.total_context_tokens} "
            f"context"
            + (f", KV cache about {self.predicted_kv_bytes / 2**20:.0f} MiB" if self.predicted_kv_bytes else "")
            + f" [{self.limits_source}]",
        ]
        if self.mode == "conversation":
            lines.append(f"  conversation chunk: {self.chunk_size} requests per conversation")
        lines.append(
            f"  prompt tokens evaluated: {self.prompt_tokens_evaluated:,} of {self.prompt_tokens_without_cache:,} "
            f"without cache ({self.prompt_tokens_saved_share:.1%} saved); estimated time: {minutes}"
        )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _align(tokens: float) -> int:
    return int(math.ceil(tokens / CONTEXT_ALIGN_TOKENS) * CONTEXT_ALIGN_TOKENS)


def size_profile(
    report, system_prompt_tokens: int, chars_per_token: float, token_source: str, default_max_tokens: int
) -> SizeProfile:
    """Turn the input scan's character counts into token figures with a calibrated chars-per-token ratio."""
    chars = np.frombuffer(report.user_chars, dtype=np.int32) if len(report.user_chars) else np.zeros(1, np.int32)
    max_tokens = np.frombuffer(report.max_tokens, dtype=np.int32) if len(report.max_tokens) else np.zeros(1, np.int32)
    max_tokens = np.where(max_tokens > 0, max_tokens, default_max_tokens)
    user_tokens = np.ceil(chars / chars_per_token) + CHAT_TEMPLATE_TOKENS_PER_MESSAGE
    longest_id, longest_chars = report.longest_request
    return SizeProfile(
        request_count=report.request_count,
        system_prompt_tokens=system_prompt_tokens,
        prefix_count=max(len(report.prefix_offsets), 1),
        user_tokens_p50=int(np.percentile(user_tokens, 50)),
        user_tokens_p99=int(np.percentile(user_tokens, 99)),
        max_tokens_p99=int(np.percentile(max_tokens, 99)),
        max_tokens_mean=float(max_tokens.mean()),
        longest_request_id=longest_id,
        longest_request_tokens=system_prompt_tokens
        + int(math.ceil(longest_chars / chars_per_token))
        + 2 * CHAT_TEMPLATE_TOKENS_PER_MESSAGE
        + int(max_tokens.max()),
        chars_per_token=chars_per_token,
        token_source=token_source,
    )


def make_plan(
    sizes: SizeProfile,
    limits: Limits,
    *,
    mode: str = "independent",
    max_slots: int = 16,
    requested_slots: int | None = None,
    requested_context: int | None = None,
    seconds_per_prompt_token: float | None = None,
    seconds_per_answer_token: float | None = None,
) -> Plan:
    """Fit the requests into what the server can hold.

    independent: each slot holds system prompt + the p99 request + its answer; slots = what the safe
    context allows, at most `max_slots`. conversation: one slot as large as allowed, and as many
    requests per conversation as fit after the system prompt.
    """
    if mode not in ("independent", "conversation"):
        raise PlanError(f"unknown mode {mode!r}; use independent or conversation")
    per_message = CHAT_TEMPLATE_TOKENS_PER_MESSAGE
    need = sizes.system_prompt_tokens + per_message + sizes.user_tokens_p99 + sizes.max_tokens_p99
    slot_ceiling = min(limits.safe_context_tokens, limits.trained_context_tokens or limits.safe_context_tokens)
    if sizes.longest_request_tokens > slot_ceiling:
        raise PlanError(
            f"the largest request, {sizes.longest_request_id!r}, needs about {sizes.longest_request_tokens} tokens "
            f"(system prompt, message and max_tokens) but at most {slot_ceiling} fit one slot "
            f"[{limits.source}]; shorten it, lower its max_tokens, or measure a larger safe context"
        )
    notes: list[str] = []
    if requested_context:
        # The user's word wins, even above the safe context: out-of-memory recovery backs off if it was too much.
        slot_ceiling = requested_context
        if sizes.longest_request_tokens > requested_context:
            notes.append(
                f"the largest request, {sizes.longest_request_id!r}, needs about "
                f"{sizes.longest_request_tokens} tokens, more than the {requested_context} asked for: "
                "requests that do not fit fail alone, into errors.jsonl"
            )
    if mode == "independent":
        wanted = _align(max(need, sizes.longest_request_tokens) * 1.05)
        slot_context = requested_context or min(
            wanted, slot_ceiling - slot_ceiling % CONTEXT_ALIGN_TOKENS or slot_ceiling
        )
        fitting = max(limits.safe_context_tokens // slot_context, 1)
        slots = requested_slots or max(1, min(fitting, max_slots, sizes.request_count))
        if requested_slots and requested_slots > fitting:
            notes.append(f"{requested_slots} slots asked for, but only {fitting} fit the safe context")
        chunk_size = 1
    else:
        slot_context = slot_ceiling - slot_ceiling % CONTEXT_ALIGN_TOKENS or slot_ceiling
        slots = requested_slots or 1
        turn = per_message * 2 + sizes.user_tokens_p99 + sizes.max_tokens_p99
        chunk_size = max(1, int((slot_context - sizes.system_prompt_tokens - per_message) // turn))
    total_context = slot_context * slots
    n = sizes.request_count
    user_mean = sizes.user_tokens_p50
    without_cache = n * (sizes.system_prompt_tokens + user_mean)
    if mode == "independent":
        evaluated = n * user_mean + sizes.system_prompt_tokens * slots * sizes.prefix_count
    else:
        chunks = math.ceil(n / chunk_size) if n else 0
        evaluated = chunks * sizes.system_prompt_tokens + n * (user_mean + int(sizes.max_tokens_mean))
    evaluated = min(evaluated, without_cache) if without_cache else 0
    estimate = None
    if seconds_per_prompt_token and seconds_per_answer_token:
        per_request = user_mean * seconds_per_prompt_token + sizes.max_tokens_mean * seconds_per_answer_token
        estimate = n * per_request / (slots if mode == "independent" else 1)
        estimate += sizes.system_prompt_tokens * seconds_per_prompt_token * sizes.prefix_count
    return Plan(
        mode=mode,
        request_count=n,
        system_prompt_tokens=sizes.system_prompt_tokens,
        request_tokens_p99=need,
        slot_context_tokens=slot_context,
        parallel_slots=slots,
        total_context_tokens=total_context,
        chunk_size=chunk_size,
        predicted_kv_bytes=limits.kv_bytes_per_token * total_context,
        prompt_tokens_without_cache=without_cache,
        prompt_tokens_evaluated=evaluated,
        prompt_tokens_saved_share=1 - evaluated / without_cache if without_cache else 0.0,
        estimated_seconds=estimate,
        limits_source=limits.source,
        token_source=sizes.token_source,
        notes=notes,
    )
