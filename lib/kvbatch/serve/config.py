"""How to start llama-server: its settings (`ServerConfig`) and the command line they make, and the KV cache types
it accepts. Binds to 127.0.0.1 only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvbatch import defaults
from kvbatch.errors import ServerStartError
from kvbatch.serve.build_record import installed_build

KV_CACHE_TYPES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}
"""The KV cache types llama-server accepts, with the bytes each stores per value (block-quantized types keep 32
values and a scale per block). A quantized V cache needs flash attention."""


def build_has_gpu() -> bool:
    """True when the installed server was built with a GPU backend (so layers are offloaded by default)."""
    build = installed_build()
    return bool(build and build.backend != "cpu")


@dataclass
class ServerConfig:
    """How to start llama-server. `context_tokens` is the total; each of `parallel_slots` gets its share."""

    model_path: Path | None = None
    context_tokens: int = defaults.CONTEXT_TOKENS
    parallel_slots: int = 1
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    swa_full: bool = False
    flash_attention: str = "auto"
    kv_unified: bool | None = False
    threads: int | None = None
    batch_tokens: int | None = None
    ubatch_tokens: int | None = None
    gpu_layers: int | None = None
    """Layers on the GPU (`--n-gpu-layers`); None offloads all of them when the build has a GPU backend."""
    ctx_checkpoints: int | None = defaults.CTX_CHECKPOINTS
    memory_cap_bytes: int | None = None
    """Hard address-space cap (RLIMIT_AS) on the server process: a KV cache too big for it fails to allocate."""
    malloc_arena_max: int | None = defaults.MALLOC_ARENA_MAX
    thread_stack_bytes: int | None = None
    """Stack size per thread (RLIMIT_STACK); defaults to 1 MiB under a cap, where every reservation counts."""
    chat_template: str | None = None
    """A llama.cpp built-in template name, for a GGUF that carries none (the server falls back to chatml)."""
    cache_ram_mib: int | None = defaults.CACHE_RAM_MIB
    binary: Path | None = None
    """A llama-server of your own; default: the one `make setup` built and smoke-tested."""
    gpu_index: int | None = None
    """Run on this GPU alone (CUDA_VISIBLE_DEVICES), for one server per card."""
    port: int | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = defaults.STARTUP_TIMEOUT_S

    @property
    def slot_context_tokens(self) -> int:
        return self.context_tokens // max(self.parallel_slots, 1)

    def stack_bytes(self) -> int | None:
        return self.thread_stack_bytes or (defaults.CAPPED_STACK_BYTES if self.memory_cap_bytes else None)

    def flags(self) -> dict[str, object]:
        """The settings that change memory, as recorded beside each measurement and run."""
        return {
            "context_tokens": self.context_tokens,
            "parallel_slots": self.parallel_slots,
            "cache_type_k": self.cache_type_k,
            "cache_type_v": self.cache_type_v,
            "swa_full": self.swa_full,
            "flash_attention": self.flash_attention,
            "kv_unified": self.kv_unified,
            "ctx_checkpoints": self.ctx_checkpoints,
            "gpu_layers": self.gpu_layers,
            "gpu_index": self.gpu_index,
            "memory_cap_bytes": self.memory_cap_bytes,
        }


def _threads_from_environment() -> int | None:
    value = os.environ.get(defaults.SERVER_THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ServerStartError(f"{defaults.SERVER_THREADS_ENV}={value!r}: give a whole number of threads, 1 or more")
    return int(value)


def server_command(config: ServerConfig, binary: Path, model_path: Path, port: int) -> list[str]:
    """The llama-server command line. Binds to 127.0.0.1 only; no /slots, /props or /metrics endpoints."""
    for kind in (config.cache_type_k, config.cache_type_v):
        if kind not in KV_CACHE_TYPES:
            raise ServerStartError(f"unknown KV cache type {kind!r}; use one of {', '.join(KV_CACHE_TYPES)}")
    command = [
        str(binary),
        "--model", str(model_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", str(config.context_tokens),
        "--parallel", str(config.parallel_slots),
        "--cache-type-k", config.cache_type_k,
        "--cache-type-v", config.cache_type_v,
        "--flash-attn", config.flash_attention,
        "--no-webui",
        "--no-slots",
        "--log-verbosity", "4",  # the KV buffer size lines are logged at this level
        "--fit", "off",  # never let the server shrink the context on its own: the size asked for is the experiment
    ]  # fmt: skip
    if config.swa_full:
        command.append("--swa-full")
    if config.kv_unified is True:
        command.append("--kv-unified")
    elif config.kv_unified is False:
        command.append("--no-kv-unified")
    gpu_layers = config.gpu_layers if config.gpu_layers is not None else (999 if build_has_gpu() else None)
    if gpu_layers is not None:
        command += ["--n-gpu-layers", str(gpu_layers)]
    if config.ctx_checkpoints is not None:
        command += ["--ctx-checkpoints", str(config.ctx_checkpoints)]
    if config.chat_template:
        command += ["--chat-template", config.chat_template]
    if config.cache_ram_mib is not None:
        command += ["--cache-ram", str(config.cache_ram_mib)]
    threads = config.threads or _threads_from_environment()
    if threads:
        command += ["--threads", str(threads)]
    if config.batch_tokens:
        command += ["--batch-size", str(config.batch_tokens)]
    if config.ubatch_tokens:
        command += ["--ubatch-size", str(config.ubatch_tokens)]
    return command + list(config.extra_args)
