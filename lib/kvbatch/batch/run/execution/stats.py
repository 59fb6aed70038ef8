"""The run's numbers: per prefix (cache hits on the shared system prompt), per endpoint, and for the whole run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PrefixStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefix_tokens: int = 0
    prefix_cached_tokens: int = 0
    """Of each request's shared-prefix tokens, how many came from the cache (cached tokens capped at the prefix)."""
    misses: int = 0


@dataclass
class EndpointStats:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    recoveries: int = 0
    out_s: float = 0.0
    """Seconds the endpoint was taken out of the pool (unhealthy) during the run."""

    def cache_share(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


@dataclass
class RunStats:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    waited_s: float = 0.0
    """Time requests spent waiting out transient faults and recoveries (summed over requests)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_tokens_known: int = 0
    completion_tokens: int = 0
    truncated_answers: int = 0
    """Answers that ended because they reached max_tokens or the context (`finish_reason: length`), kept or asked
    again."""
    answers_checked: int = 0
    """Requests whose response_format asked for JSON, finished (a success or a failure for its answer)."""
    answers_valid_first: int = 0
    """Of those, the ones whose first answer kept to it."""
    invalid_answers: dict[str, int] = field(default_factory=dict)
    """Answers that did not keep to their request's response_format, by kind (not_json, cut, schema)."""
    started_unix_s: float = field(default_factory=time.time)
    per_prefix: dict[str, PrefixStats] = field(default_factory=dict)
    per_endpoint: dict[str, EndpointStats] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    def cache_share(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens and self.cached_tokens_known else None

    def system_prompt_share(self) -> float | None:
        """Share of the shared-prefix (system prompt) tokens served from the cache, over all prefixes."""
        total = sum(p.prefix_tokens for p in self.per_prefix.values())
        return sum(p.prefix_cached_tokens for p in self.per_prefix.values()) / total if total else None

    def endpoint(self, label: str) -> EndpointStats:
        stats = self.per_endpoint.get(label)
        return stats if stats is not None else self.per_endpoint.setdefault(label, EndpointStats())
