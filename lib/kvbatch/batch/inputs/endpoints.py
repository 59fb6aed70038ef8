"""Which servers a run uses: the embedded one (or several: `--servers N`, `--servers per-gpu`), one or more running
servers (`--url`, repeatable), an endpoints file (`--endpoints FILE`, TOML), or Ray actors (`--ray ADDRESS`).

An endpoints file lists one `[[endpoint]]` table per server:

    [[endpoint]]
    url = "http://10.0.0.5:11434"
    backend = "ollama"          # or "openai" (default)
    model = "gemma3:12b"
    slots = 4                   # optional: else discovered from the server
    api_key_env = "HOST5_KEY"   # optional: the environment variable holding its API key

Unknown keys are refused with the file, line and key: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from kvbatch.errors import UserInputError
from kvbatch.serve.backends import Backend, BackendOptions, get_backend, known_backends

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENDPOINT_KEYS = {"url", "backend", "model", "slots", "api_key_env"}


@dataclass(frozen=True)
class EndpointSpec:
    """One server the run uses."""

    kind: str
    """`embedded`, `external` or `ray`."""
    url: str | None = None
    backend: str = "openai"
    model: str | None = None
    slots: int | None = None
    api_key_env: str | None = None
    gpu: int | None = None
    """Embedded, one server per GPU: the card it runs on (CUDA_VISIBLE_DEVICES)."""

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def backend_for(spec: EndpointSpec, options: BackendOptions, **extras: object) -> Backend:
    """The backend that reaches an external server the run uses: its kind, URL and model, the run's options with
    this server's own key (from its `api_key_env`, else the options' or KVBATCH_API_KEY), and a backend's extras."""
    key = spec.api_key() or options.api_key
    return get_backend(spec.backend, spec.url or "", model=spec.model, options=replace(options, api_key=key), **extras)


def _line_of(text: str, key: str, occurrence: int) -> int:
    seen = -1
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("[[endpoint]]"):
            seen += 1
        if seen == occurrence and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return 1


def read_endpoints_file(path: Path) -> list[EndpointSpec]:
    path = Path(path)
    try:
        text = path.read_text("utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError as exc:
        raise UserInputError(f"endpoints file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML ({exc})") from exc
    entries = data.get("endpoint")
    extra = [key for key in data if key != "endpoint"]
    if extra:
        raise UserInputError(f"{path}:{_line_of(text, extra[0], -1)}: {extra[0]}: unknown key; list servers as "
                             "[[endpoint]] tables")  # fmt: skip
    if not isinstance(entries, list) or not entries:
        raise UserInputError(f'{path}: no [[endpoint]] tables; each needs at least url = "http://..."')
    specs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserInputError(f'{path}: endpoint {index + 1} must be a [[endpoint]] table with url = "..."')
        for key in entry:
            if key not in ENDPOINT_KEYS:
                raise UserInputError(f"{path}:{_line_of(text, key, index)}: {key}: unknown key (known: "
                                     f"{', '.join(sorted(ENDPOINT_KEYS))})")  # fmt: skip
        url = entry.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UserInputError(f"{path}:{_line_of(text, 'url', index)}: url: endpoint {index + 1} needs "
                                 "url = \"http://host:port\"")  # fmt: skip
        backend = entry.get("backend", "openai")
        if backend not in known_backends():
            raise UserInputError(f"{path}:{_line_of(text, 'backend', index)}: backend: {backend!r} is not one of "
                                 f"{', '.join(known_backends())}")  # fmt: skip
        slots = entry.get("slots")
        if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
            raise UserInputError(f"{path}:{_line_of(text, 'slots', index)}: slots: must be a whole number >= 1")
        specs.append(EndpointSpec("external", url=url, backend=backend, model=entry.get("model"), slots=slots,
                                  api_key_env=entry.get("api_key_env")))  # fmt: skip
    return specs


def endpoint_specs(
    *,
    urls: list[str] | None,
    endpoints_file: Path | None,
    backend: str,
    model: str | None,
    servers: str | int | None,
    ray: str | None,
) -> list[EndpointSpec]:
    """The servers of a run, from the command line."""
    chosen = [name for name, value in (("--url", urls), ("--endpoints", endpoints_file), ("--ray", ray)) if value]
    if len(chosen) > 1:
        raise UserInputError(f"{' and '.join(chosen)} cannot be combined: name the servers one way")
    if endpoints_file:
        return read_endpoints_file(endpoints_file)
    if urls:
        return [EndpointSpec("external", url=url, backend=backend, model=model) for url in urls]
    if ray:
        return [EndpointSpec("ray", url=ray)]
    if servers in (None, 1, "1"):
        return [EndpointSpec("embedded")]
    if servers == "per-gpu":
        from kvbatch.serve.probes import gpu_memory

        cards = gpu_memory()
        if not cards:
            raise UserInputError("--servers per-gpu: no NVIDIA GPU answers here (nvidia-smi); use --servers N")
        return [EndpointSpec("embedded", gpu=card.index) for card in cards]
    try:
        count = int(servers)
    except ValueError as exc:
        raise UserInputError(f"--servers: {servers!r} is neither a number nor per-gpu") from exc
    if count < 1:
        raise UserInputError("--servers: must be at least 1")
    return [EndpointSpec("embedded") for _ in range(count)]
