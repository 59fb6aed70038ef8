"""What llama-server's log says: its KV, model and compute buffers (one KV line per cache and device), slot
contexts, layers offloaded to a GPU, the build's `system_info`, context checkpoints, and the line that explains a
failure. The server logs these at `--log-verbosity 4`."""

from __future__ import annotations

import collections
import re
import signal
import threading
from dataclasses import dataclass, field

from kvbatch import defaults
from kvbatch.errors import looks_like_oom

_MIB = 1024 * 1024
_BUFFER_LINE = re.compile(
    r"(?P<where>[\w.-]+)\s+(?P<kind>KV|model|compute|output) buffer size\s*=\s*(?P<mib>[\d.]+) MiB"
)
_VOCAB_LINE = re.compile(r"print_info: n_vocab\s*=\s*(?P<n>\d+)")
_SLOT_CTX_LINE = re.compile(r"new slot.*?n_ctx(?:_slot)?\s*=\s*(?P<n>\d+)")
_OFFLOADED_LINE = re.compile(r"offloaded (?P<on>\d+)/(?P<all>\d+) layers to GPU")
_SYSTEM_INFO_LINE = re.compile(r"system_info: (?P<info>.*)$", re.M)
_CHECKPOINT_LINE = re.compile(r"created context checkpoint .*?size = (?P<mib>[\d.]+) MiB")
_ERROR_LINE = re.compile(r"\berror\b|failed|exception|terminate", re.I)
"""A line that may explain a failure: what the parser quotes, and what the sink keeps after the load."""
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [DIWE] ")  # llama.cpp's "0.00.939.418 E " timestamp and level


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
    output_buffer_bytes: dict[str, int] = field(default_factory=dict)
    """The logits buffer (vocabulary x slots floats), allocated and cleared at load."""
    vocab_size: int | None = None

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
    output: dict[str, int] = {}
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
                target = {"model": model, "compute": compute, "output": output}[match.group("kind")]
                target[where] = target.get(where, 0) + size
    slots = [int(m.group("n")) for m in _SLOT_CTX_LINE.finditer(text)]
    offloaded = _OFFLOADED_LINE.search(text)
    info = _SYSTEM_INFO_LINE.search(text)
    checkpoints = [int(float(m.group("mib")) * _MIB) for m in _CHECKPOINT_LINE.finditer(text)]
    vocab = _VOCAB_LINE.search(text)
    oom_lines = [line for line in lines if looks_like_oom(line)]
    error_lines = [line for line in lines if _ERROR_LINE.search(line)]
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
        output,
        int(vocab.group("n")) if vocab else None,
    )


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        meaning = {"SIGILL": " (illegal instruction)", "SIGKILL": " (killed)", "SIGSEGV": " (segmentation fault)"}
        return f"was killed by {name}{meaning.get(name, '')}"
    return f"exited with code {code}"


class ServerLogSink:
    """Copies the server's output into its log file without letting the file grow with the number of requests.

    At `--log-verbosity 4` (which the KV buffer lines need) llama-server writes about 3 KB per request: some 500 MB
    over 170,000 requests, read whole at every recovery. The sink keeps everything until the server listens (the
    load: buffers, layers, system_info, a failure to start), then only warnings, errors, out-of-memory lines and the
    first few checkpoint lines; the last `TAIL_LINES` (defaults) are kept in memory and appended when the server exits
    (what it said before a crash). A thread reads the pipe, so nothing here runs on an event loop.
    """

    def __init__(self, stream, path) -> None:
        self._stream = stream
        self._path = path
        self._tail: collections.deque[bytes] = collections.deque(maxlen=defaults.TAIL_LINES)
        """The last lines not kept in the file (the kept ones are there already)."""
        self._listening = False
        self._kept = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._copy, name=f"server-log-{path.name}", daemon=True)
        self._thread.start()

    def _keep(self, line: bytes) -> bool:
        if not self._listening:
            if b"listening on" in line or b"server is listening" in line:
                self._listening = True
            return True
        text = line.decode("utf-8", "replace")
        level = _LOG_PREFIX.match(text)
        if level and text[level.end() - 2] in "WE":
            return True
        if looks_like_oom(text) or _ERROR_LINE.search(text):
            return True
        if _CHECKPOINT_LINE.search(text) and self._kept < defaults.KEPT_AFTER_LISTENING:
            self._kept += 1
            return True
        return False

    def _copy(self) -> None:
        """Drain the pipe whatever happens to the file (a full disk, a deleted folder): a server whose output nobody
        reads blocks on its next write."""
        out = self._open()
        for line in iter(self._stream.readline, b""):
            if not self._keep(line):
                self._tail.append(line)
                self._dropped += 1
            elif out is not None:
                try:
                    out.write(line)
                    out.flush()
                except OSError:
                    out = None
        if out is not None:
            try:
                if self._dropped:
                    out.write(f"--- kvbatch: {self._dropped} per-request lines were not kept; the last "
                              f"{len(self._tail)} of them:\n".encode())  # fmt: skip
                    out.writelines(self._tail)
                out.close()
            except OSError:
                pass
        self._stream.close()

    def _open(self):
        try:
            return open(self._path, "ab")  # noqa: SIM115 (held for the server's life, closed in _copy)
        except OSError:
            return None

    def join(self, timeout_s: float = 5.0) -> None:
        """Wait for the copy to finish (the server exited and closed its end of the pipe)."""
        self._thread.join(timeout_s)
