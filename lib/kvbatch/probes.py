"""Memory probes: each reads one number of bytes and says which probe it is, so every figure names its source.

NVML (through nvidia-ml-py, imported as `pynvml`) on NVIDIA GPUs; the server process tree's RSS on CPU
machines; Ollama's /api/ps; the KV buffer sizes the server writes in its own log.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from kvbatch.errors import UserInputError


@dataclass(frozen=True)
class MemoryReading:
    probe: str
    bytes: int
    t_s: float


class MemoryProbe(abc.ABC):
    """One source of a memory figure. `read()` returns bytes; `name` says where it came from."""

    name: str = ""

    @abc.abstractmethod
    def read(self) -> int:
        """Bytes in use now, as this probe sees them."""

    def reading(self) -> MemoryReading:
        return MemoryReading(self.name, self.read(), time.time())

    def total(self) -> int | None:
        """The capacity this probe's figure counts against (a GPU's memory), if it has one."""
        return None


def _nvml():
    import pynvml  # from nvidia-ml-py

    pynvml.nvmlInit()
    return pynvml


def nvml_available() -> bool:
    """True when an NVIDIA driver answers and at least one GPU is present."""
    try:
        return _nvml().nvmlDeviceGetCount() > 0
    except Exception:  # pynvml raises NVMLError subclasses, or OSError when the library is absent
        return False


class NvmlDeviceProbe(MemoryProbe):
    """Memory used on one GPU, all processes together (what decides whether the next allocation fits)."""

    name = "nvml-device"

    def __init__(self, index: int = 0) -> None:
        self._pynvml = _nvml()
        self._handle = self._pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def total(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)


class NvmlProcessProbe(MemoryProbe):
    """GPU memory held by one process tree (the server), from NVML's per-process accounting."""

    name = "nvml-process"

    def __init__(self, pid: int, index: int = 0) -> None:
        self._pynvml = _nvml()
        self._handle = self._pynvml.nvmlDeviceGetHandleByIndex(index)
        self.pid = pid

    def read(self) -> int:
        pids = _process_tree_pids(self.pid)
        used = 0
        for proc in self._pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if proc.pid in pids and proc.usedGpuMemory:
                used += int(proc.usedGpuMemory)
        return used

    def total(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)


def _process_tree_pids(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid} | {child.pid for child in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


class ProcessRssProbe(MemoryProbe):
    """Resident memory of the server's process tree: on a CPU machine the KV cache lives here."""

    name = "process-rss"

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def read(self) -> int:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total


class OllamaPsProbe(MemoryProbe):
    """Ollama's own figure for a loaded model (`/api/ps`): `size_vram` on a GPU, `size` otherwise."""

    name = "ollama-ps"

    def __init__(self, base_url: str, model: str | None = None, *, field: str = "size") -> None:
        import ollama

        self._client = ollama.Client(host=base_url, timeout=10)
        self.model = model
        self.field = field

    def read(self) -> int:
        for entry in self._client.ps().models:
            if self.model is None or self.model in (entry.model, entry.name):
                return int(getattr(entry, self.field) or 0)
        return 0


class ServerLogKvProbe(MemoryProbe):
    """The KV buffer sizes llama-server states in its log at load: exact for the cache, blind to everything else."""

    name = "server-log-kv"

    def __init__(self, read_log_text: Callable[[], str]) -> None:
        self._read_log_text = read_log_text

    def read(self) -> int:
        from kvbatch.server import parse_server_log

        return parse_server_log(self._read_log_text()).kv_total_bytes


PROBE_NAMES = ("nvml-device", "nvml-process", "process-rss", "ollama-ps", "server-log-kv")


def pick_probe(
    prefer: str | None = None,
    *,
    pid: int | None = None,
    ollama_url: str | None = None,
    ollama_model: str | None = None,
    log_text: Callable[[], str] | None = None,
) -> MemoryProbe:
    """The best probe available here, or the one the user forced with `prefer`.

    Order: a GPU's own count (NVML) when a GPU is present; Ollama's /api/ps for Ollama; the server's RSS;
    the server log's KV lines as the last resort.
    """
    if prefer in (None, "auto"):
        if nvml_available():
            return NvmlDeviceProbe()
        if ollama_url:
            return OllamaPsProbe(ollama_url, ollama_model)
        if pid:
            return ProcessRssProbe(pid)
        if log_text:
            return ServerLogKvProbe(log_text)
        raise UserInputError("no memory probe is available: give a server PID, an Ollama URL, or run on a GPU")
    if prefer == "nvml-device":
        return NvmlDeviceProbe()
    if prefer == "nvml-process" and pid:
        return NvmlProcessProbe(pid)
    if prefer == "process-rss" and pid:
        return ProcessRssProbe(pid)
    if prefer == "ollama-ps" and ollama_url:
        return OllamaPsProbe(ollama_url, ollama_model, field="size_vram" if nvml_available() else "size")
    if prefer == "server-log-kv" and log_text:
        return ServerLogKvProbe(log_text)
    if prefer in PROBE_NAMES:
        raise UserInputError(f"memory probe {prefer!r} cannot run here (it needs a GPU, a server PID or an Ollama URL)")
    raise UserInputError(f"unknown memory probe {prefer!r}; known probes: auto, {', '.join(PROBE_NAMES)}")
