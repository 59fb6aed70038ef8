"""summary.json: what a run did, written from a typed model at the end of each invocation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

SUMMARY_SCHEMA_VERSION = 2


class EndpointSummary(BaseModel):
    label: str
    server: dict[str, Any] = Field(default_factory=dict)
    completed: int
    failed: int
    retries: int
    recoveries: int
    requests_per_s: float | None
    cache_share_of_prompt_tokens: float | None
    out_of_pool_s: float


class Summary(BaseModel):
    schema_version: int = SUMMARY_SCHEMA_VERSION
    requests_in_input: int
    completed_this_invocation: int
    failed_this_invocation: int
    completed_total: int
    failed_total: int
    retries: int
    waited_s: float
    """Time requests spent waiting out faults and recoveries, summed over requests."""
    elapsed_s: float
    requests_per_s: float | None
    estimated_s: float | None
    """The plan's estimate for this invocation's requests."""
    re_estimated_s: float | None
    """The estimate re-made from the run's own rate after its first minutes (None for a shorter run)."""
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    answers_cut_at_max_tokens: int
    """Answers that ended at max_tokens or the context (`finish_reason: length`), kept or asked again."""
    answers_checked: int = 0
    """Requests whose response_format asked for JSON, finished this invocation."""
    answers_valid_at_first_attempt: int = 0
    invalid_answers: dict[str, int] = Field(default_factory=dict)
    """Answers that broke their request's response_format, by kind (not_json, cut, schema), re-asked or failed."""
    cache_share_of_prompt_tokens: float | None
    system_prompt_share_served_from_cache: float | None
    per_prefix: dict[str, dict[str, Any]] = Field(default_factory=dict)
    per_endpoint: list[EndpointSummary] = Field(default_factory=list)
    concurrency_trials: list[dict[str, Any]] = Field(default_factory=list)
    memory_peak_bytes: int | None
    memory_probe: str | None
    mode: str
    parallel_slots: int
    slot_context_tokens: int

    @classmethod
    def read(cls, path: Path) -> Summary | None:
        """summary.json, or None before the first invocation has ended."""
        return cls.model_validate_json(path.read_text("utf-8")) if path.exists() else None

    @staticmethod
    def fields(path: Path) -> dict:
        """summary.json's fields as written ({} before the first invocation has ended), for the report, which
        renders runs that older versions of kvbatch wrote (fields missing or since renamed) too."""
        return json.loads(path.read_text("utf-8")) if path.exists() else {}

