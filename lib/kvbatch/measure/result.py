"""The measurement result file: one typed model, one name for each (backend, model, KV cache types), loaded and
saved here alone. `kvbatch measure` writes it section by section (partial results survive a later failure);
`kvbatch plan` and `kvbatch run` read it. The public field names below are stable for notebooks and users.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvbatch import defaults
from kvbatch.errors import UserInputError
from kvbatch.measure.kvmodel import KvCacheTypes

SCHEMA_VERSION = 3


class SearchStepRecord(BaseModel):
    """One load of the safe-context search."""

    context_tokens: int
    fits: bool
    reason: str
    seconds: float
    error: bool = False
    """True when the load failed for a reason other than memory (a timeout, a 404): not counted as too big."""


class NotMeasured(BaseModel):
    """A point a sweep could not measure: its allocation did not fit (out of memory, refused, spilled to the CPU),
    or its fill could not be made. A result: the fit leaves it out, the report marks it."""

    context_tokens: int
    tokens: int | None = None
    """The fill asked for (sweep B), when the allocation fitted but the fill could not be made."""
    what: str
    """"does not fit" or "could not fill"."""
    reason: str


class Sustained(BaseModel):
    passed: bool
    reasons: list[str] = Field(default_factory=list)
    duration_s: float
    requests: int
    errors: int = 0
    slots: int
    slot_context_tokens: int
    requests_per_s: float | None = None
    """Throughput at this layout with the tested batch's request sizes: the plan's time estimate for that layout."""
    memory_peak_bytes: int | None = None
    memory_drift_bytes: float | None = None
    budget_bytes: int | None = None
    planned_bytes: int | None = None
    """The plan's memory at its peak for this layout: a load whose peak passed it failed."""
    requests_per_interval: list[int] = Field(default_factory=list)
    slot_requests: list[int] = Field(default_factory=list)
    slot_tokens: list[int] = Field(default_factory=list)
    """Tokens each slot served (prompt + answer, the server's counts): a load is sustained once each reaches the
    slot's context."""
    stopped_by: str | None = None
    ceiling_s: float | None = None


class EstimatorRecord(BaseModel):
    """One estimator at one layout (measure/estimators.py's VerdictRow), beside what the server showed."""

    estimator: str
    context: int
    slots: int
    kv_bytes: float | None = None
    total_bytes: float | None = None
    kv_error: float | None = None
    total_error: float | None = None
    server_kv_bytes: float | None = None
    server_after_load_bytes: float | None = None


class Measurement(BaseModel):
    """What `kvbatch measure` found for one model and KV cache configuration."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    backend: str
    """`embedded` (llama-server started here) or `ollama`."""
    model: str
    """The model's identity: the GGUF file name (embedded) or the Ollama model name."""
    kv_cache_type: str = "f16-f16"
    """K and V cache types, with `-swafull` when the sliding layers kept the whole context."""
    parallel_slots: int = 1
    """Slots the slope was measured at: per token of `--ctx-size` at one slot, or of `num_ctx` at Ollama's
    OLLAMA_NUM_PARALLEL (which allocates num_ctx x parallel)."""
    kv_bytes_per_token: float | None = None
    """Measured slope of memory against allocated context."""
    kv_bytes_per_token_ci95: tuple[float, float] | None = None
    kv_bytes_per_token_predicted: float | None = None
    base_bytes: float | None = None
    """Measured memory at zero context (the fit's intercept): weights, fixed buffers, one slot's window cache."""
    r_squared: float | None = None
    repeat_spread_share: float | None = None
    """Largest disagreement between repeats of one context, as a share of its memory (flagged above 2 %)."""
    findings: list[str] = Field(default_factory=list)
    """What the measurement flags, in words (poor fit, slope far from the architecture, repeats disagreeing)."""
    probe: str | None = None
    contexts: list[int] = Field(default_factory=list)
    repeats: int | None = None
    address_space_bytes_per_token: float | None = None
    """Slope of the server's address space (what an RLIMIT_AS cap limits on a CPU)."""
    in_use_growth_bytes: float | None = None
    in_use_context_tokens: int | None = None
    not_measured: list[NotMeasured] = Field(default_factory=list)
    """Points of the sweeps that did not fit or could not be filled, with their reasons."""
    budget_bytes: int | None = None
    budget: str | None = None
    """The budget in words, with where it came from (a GPU's memory, a cap, the demo headroom)."""
    budget_is_demo: bool = False
    largest_context_tokens: int | None = None
    safe_context_tokens: int | None = None
    safety_margin: float = defaults.SAFETY_MARGIN
    search_steps: list[SearchStepRecord] = Field(default_factory=list)
    enforced_by: str | None = None
    server_flags: dict[str, Any] = Field(default_factory=dict)
    build: dict[str, Any] = Field(default_factory=dict)
    architecture: dict[str, Any] = Field(default_factory=dict)
    trained_context_tokens: int | None = None
    prompt_tokens_per_s: float | None = None
    answer_tokens_per_s: float | None = None
    sustained: Sustained | None = None
    estimators: list[EstimatorRecord] = Field(default_factory=list)
    """Each estimator's figure beside what the server allocated and held, per context and slot count (schema 3)."""
    estimator_verdicts: dict[str, str] = Field(default_factory=dict)
    """One sentence per estimator: how wrong it was on this model, and why."""
    measured_at: str = Field(default_factory=lambda: dt.datetime.now().isoformat(timespec="seconds"))

    @property
    def types(self) -> KvCacheTypes:
        k, v, *rest = self.kv_cache_type.split("-")
        return KvCacheTypes(k, v, swa_full=bool(rest))


def model_identity(backend: str, model: str | None, model_path: str | Path | None) -> str:
    """The model's name in a measurement: the Ollama model name, or the GGUF file's name."""
    if backend == "ollama":
        if not model:
            raise UserInputError("the ollama backend needs --model")
        return model
    if model_path:
        return Path(model_path).name
    from kvbatch.serve.server import default_model_path

    return default_model_path().name


def measurement_path(
    backend: str, model: str, types: KvCacheTypes, directory: Path = defaults.MEASUREMENTS_DIR
) -> Path:
    """The one name of a measurement file, for `kvbatch measure` and `kvbatch run` alike."""
    safe = re.sub(r"[^\w.-]+", "-", model).strip("-")
    kind = "ollama" if backend == "ollama" else "embedded"
    return Path(directory) / f"{kind}__{safe}__{types.label}.json"


def find_measurement(
    backend: str, model: str, types: KvCacheTypes, directory: Path = defaults.MEASUREMENTS_DIR
) -> Path:
    """The measurement file for (backend, model, types): `measurement_path`, after moving a file written under the
    name kvbatch used before schema 2 (`<gguf stem>__<types>.json`) there, migrated."""
    path = measurement_path(backend, model, types, directory)
    legacy = Path(directory) / f"{Path(model).stem}__{types.label}.json"
    if backend == "embedded" and not path.exists() and legacy.exists():
        save_measurement(load_measurement(legacy), path)
        legacy.unlink()
    return path


def _migrate(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Files from before schema 2 (sections `fit`, `safe_context`, `sustained`, `speeds`) read into today's fields."""
    if "schema_version" in data:
        if data["schema_version"] > SCHEMA_VERSION:
            raise UserInputError(f"{path}: written by a newer kvbatch (schema {data['schema_version']}); upgrade it")
        if data["schema_version"] == 2:  # schema 3 added the estimators' verdict: none measured yet
            data = {**data, "schema_version": 3, "estimators": [], "estimator_verdicts": {}}
        return data
    fit = data.get("fit") or {}
    safe = data.get("safe_context") or {}
    if not fit and not safe:
        raise UserInputError(f"{path}: not a measurement file kvbatch can read; re-measure with `make measure`")
    name = path.stem.split("__")[0]
    speeds = data.get("speeds") or {}
    return {
        "backend": "embedded",
        "model": name if name.endswith(".gguf") else f"{name}.gguf",
        "kv_cache_type": path.stem.split("__")[-1] if "__" in path.stem else "f16-f16",
        "kv_bytes_per_token": fit.get("slope_bytes_per_token"),
        "kv_bytes_per_token_ci95": fit.get("slope_ci95"),
        "kv_bytes_per_token_predicted": fit.get("predicted_slope_bytes_per_token"),
        "base_bytes": fit.get("base_bytes"),
        "r_squared": fit.get("r_squared"),
        "probe": fit.get("probe"),
        "address_space_bytes_per_token": fit.get("virtual_slope_bytes_per_token"),
        "budget_bytes": safe.get("budget_bytes"),
        "budget": safe.get("budget"),
        "budget_is_demo": str(safe.get("budget", "")).find("serving at") >= 0,
        "largest_context_tokens": safe.get("max_context_tokens"),
        "safe_context_tokens": safe.get("safe_context_tokens"),
        "server_flags": data.get("server_flags") or {},
        "architecture": data.get("architecture") or {},
        "trained_context_tokens": data.get("trained_context_tokens"),
        "prompt_tokens_per_s": speeds.get("prompt_tokens_per_s"),
        "answer_tokens_per_s": speeds.get("answer_tokens_per_s"),
        "measured_at": data.get("updated") or dt.datetime.now().isoformat(timespec="seconds"),
    }


def load_measurement(path: Path) -> Measurement:
    """Read a measurement file (migrating an older one); a broken file is one sentence naming it."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
        return Measurement.model_validate(_migrate(data, Path(path)))
    except FileNotFoundError as exc:
        raise UserInputError(f"measurement file not found: {path}; measure first with `make measure`") from exc
    except (json.JSONDecodeError, ValidationError) as exc:
        raise UserInputError(f"{path}: not a valid measurement file ({exc}); re-measure with `make measure`") from exc


def save_measurement(result: Measurement, path: Path) -> Path:
    """Write atomically: a crash mid-write leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(result.model_dump_json(indent=2), "utf-8")
    os.replace(temp, path)
    return path


def update_measurement(path: Path, *, backend: str, model: str, types: KvCacheTypes, **fields: Any) -> Measurement:
    """Set some fields of the file for (backend, model, types), creating it if needed; returns the whole result."""
    path = Path(path)
    if path.exists():
        current = load_measurement(path)
    else:
        current = Measurement(backend=backend, model=model, kv_cache_type=types.label)
    updated = current.model_copy(update={**fields, "measured_at": dt.datetime.now().isoformat(timespec="seconds")})
    save_measurement(Measurement.model_validate(updated.model_dump()), path)
    return updated
