"""Everything one invocation of `kvbatch run` (or `plan`) decides, with its defaults from kvbatch.defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbatch import defaults
from kvbatch.batch.runfolder import RunFolder
from kvbatch.serve.backends import BackendOptions
from kvbatch.serve.config import ServerConfig


@dataclass
class BatchSettings:
    input_path: Path
    folder: RunFolder
    system_prompt_path: Path | None = None
    template: str | None = None
    id_column: str | None = None
    schema_path: Path | None = None
    """`--schema FILE`: the JSON Schema every answer of a table input must keep to."""
    mode: str = "independent"
    concurrency: int | str = "auto"
    slots: int | None = None
    """Slots asked for (`--slots`); default: as many as the budget fits, at most defaults.MAX_SLOTS."""
    slot_context_tokens: int | None = None
    """Per-slot context asked for (`--slot-ctx`); default: the largest request, planned."""
    kv_type: str = "f16"
    """The KV cache type, or `auto` to take the one that fits the most slots."""
    kv_type_given: bool = False
    """`--kv-type` was given: Ollama's cache type is the server's setting, inferred from its sizes unless given."""
    urls: list[str] = field(default_factory=list)
    endpoints_file: Path | None = None
    backend: str = "openai"
    model: str | None = None
    servers: str | int | None = None
    ray: str | None = None
    ray_actors: int | None = None
    """Server actors to place (default: one per GPU in the cluster, else one per node)."""
    parallel: int | None = None
    """Ollama's OLLAMA_NUM_PARALLEL, the server's setting (default: inferred from its /api/ps sizes)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    memory_budget: str | None = None
    safety_margin: float = defaults.SAFETY_MARGIN
    measurement_path: Path | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    default_max_tokens: int = defaults.DEFAULT_MAX_TOKENS
    max_attempts: int = defaults.MAX_ATTEMPTS
    answer_attempts: int = defaults.ANSWER_ATTEMPTS
    max_wait_s: float = defaults.MAX_WAIT_S
    request_timeout_s: float = defaults.REQUEST_TIMEOUT_S
    retry_failed: bool = False
    progress: bool = True
    memory_threshold_bytes: int | None = None
    memory_sample_s: float = defaults.MEMORY_SAMPLE_S
    restart_above_bytes: int | None = None
    """Drain and restart our own server past this memory (default: the plan's peak and its allowance)."""
    allow_cpu_spill: bool = False

    def backend_options(self) -> BackendOptions:
        """What every backend of this run takes (`--request-timeout`); each server's key comes with its spec."""
        return BackendOptions(request_timeout_s=self.request_timeout_s)

    @property
    def is_table(self) -> bool:
        return self.template is not None or self.system_prompt_path is not None
