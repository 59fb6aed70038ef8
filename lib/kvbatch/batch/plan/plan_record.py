"""plan.json (and `kvbatch plan --json`): the plan as a typed model with a schema version. Its field names are
stable for scripts and notebooks (`slot_context_tokens`, `parallel_slots`, `chunk_size`, `mode`, `kv_cache_bytes`,
`measurement_file`)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

PLAN_SCHEMA_VERSION = 2


class MemoryRecord(BaseModel):
    base_bytes: int
    global_kv_bytes: int
    sliding_kv_bytes: int
    checkpoint_bytes: int
    checkpoints_counted_in_budget: bool
    serving_bytes: int = 0
    """What the server takes once it serves: its compute buffer, each slot's logits and sampler."""
    total_bytes: int


class PlanRecord(BaseModel):
    """plan.json, and what `kvbatch plan --json` prints."""

    schema_version: int = PLAN_SCHEMA_VERSION
    mode: str
    request_count: int
    system_prompt_tokens: int
    request_tokens_p99: int
    slot_context_tokens: int
    parallel_slots: int
    total_context_tokens: int
    chunk_size: int
    kv_cache_type: str
    kv_cache_bytes: int | None
    """The whole KV cache the server allocates for this layout (global and sliding-window layers)."""
    memory: MemoryRecord | None
    budget_bytes: int | None
    budget: str | None
    safety_margin: float
    prompt_tokens_without_cache: int
    prompt_tokens_evaluated: int
    prompt_tokens_saved_share: float
    estimated_seconds: float | None
    estimate_basis: str
    limits_source: str
    token_source: str
    chars_per_token: float
    measurement_file: str | None
    measurement_reason: str | None
    notes: list[str] = Field(default_factory=list)
    server: dict[str, object] = Field(default_factory=dict)


def plan_document(records: list[PlanRecord]) -> dict:
    """plan.json's shape, the one place it is made: one endpoint's record, or the first one's with every endpoint's
    under `endpoints` (what `kvbatch plan --json` prints too)."""
    dumped = [record.model_dump() for record in records]
    return {**dumped[0], "endpoints": dumped} if len(dumped) > 1 else dumped[0]


def read_plan(path: Path) -> dict:
    """plan.json as written by `plan_document` ({} where it is missing or unreadable: a run not yet planned)."""
    try:
        return json.loads(path.read_text("utf-8")) if path.exists() else {}
    except ValueError:
        return {}
