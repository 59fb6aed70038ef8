"""Memory probes: each reads one number of bytes and says which probe it is, so every figure names its source.

NVML (through nvidia-ml-py, imported as `pynvml`) for what a server holds on an NVIDIA GPU; the server process
tree's RSS where it runs on the CPU; Ollama's /api/ps (through the backend); the KV buffer sizes the server writes
in its own log. The probe follows where the server put the model: its log says how many layers it offloaded.
"""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from kvbatch.errors import UserInputError

if TYPE_CHECKING:
    from kvbatch.serve.backends.ollama_native import OllamaBackend


class MemoryProbe(abc.ABC):
    """One source of a memory figure. `read()` returns bytes; `name` says where it came from."""

    name: str = ""

    @abc.abstractmethod
    def read(self) -> int:
        """Bytes in use now, as this probe sees them."""

    async def aread(self) -> int:
        """The same from async code (probes that ask a server over HTTP override this)."""
        return await asyncio.to_thread(self.read)


# ---- NVIDIA GPUs -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
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


@dataclass(frozen=True)
class GpuMemory:
    """One card's memory, and what the processes on it hold (other than the ones we exclude)."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    others_bytes: int
    """Held by processes other than the excluded PIDs (the server we measure): taken from the budget."""


def gpu_memory(exclude_pids: set[int] | None = None) -> list[GpuMemory]:
    """Every visible GPU's totals, and what other processes hold on it (NVML per-process accounting)."""
    if not nvml_available():
        return []
    nvml = _nvml()
    cards = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        others = 0
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid not in (exclude_pids or set()) and proc.usedGpuMemory:
                others += int(proc.usedGpuMemory)
        name = nvml.nvmlDeviceGetName(handle)
        cards.append(GpuMemory(index, name.decode() if isinstance(name, bytes) else str(name), int(info.total),
                               int(info.used), others))  # fmt: skip
    return cards


def _process_tree_pids(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid} | {child.pid for child in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


class NvmlDeviceProbe(MemoryProbe):
    """Memory used on one GPU, all processes together."""

    name = "nvml-device"

    def __init__(self, index: int = 0) -> None:
        self._handle = _nvml().nvmlDeviceGetHandleByIndex(index)

    def read(self) -> int:
        return int(_nvml().nvmlDeviceGetMemoryInfo(self._handle).used)


class NvmlProcessProbe(MemoryProbe):
    """GPU memory held by one process tree (the server) on every card, from NVML's per-process accounting: what
    the server itself costs, whatever else runs on the card."""

    name = "nvml-process"

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def read(self) -> int:
        pids = _process_tree_pids(self.pid)
        nvml = _nvml()
        used = 0
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids and proc.usedGpuMemory:
                    used += int(proc.usedGpuMemory)
        return used


# ---- CPU, Ollama, the log ----------------------------------------------------------------------------------------
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
    """Ollama's own figure for a loaded model (`/api/ps`), asked through the backend: `size_vram` when the budget
    is a GPU's, `size` otherwise."""

    name = "ollama-ps"

    def __init__(self, backend: OllamaBackend, *, field: str = "size") -> None:
        self.backend = backend
        self.field = field

    async def aread(self) -> int:
        entry = await self.backend.loaded()
        if entry is None:
            return 0
        return entry.vram_bytes if self.field == "size_vram" else entry.size_bytes

    def read(self) -> int:
        from kvbatch.aio import run_sync

        return run_sync(self.aread())


class ServerLogKvProbe(MemoryProbe):
    """The KV buffer sizes llama-server states in its log at load: exact for the cache, blind to everything else."""

    name = "server-log-kv"

    def __init__(self, read_log_text: Callable[[], str]) -> None:
        self._read_log_text = read_log_text

    def read(self) -> int:
        from kvbatch.serve.log import parse_server_log

        return parse_server_log(self._read_log_text()).kv_total_bytes


PROBE_NAMES = ("nvml-device", "nvml-process", "process-rss", "server-log-kv")


def probe_for_server(pid: int, log_text: Callable[[], str], prefer: str | None = None) -> MemoryProbe:
    """The probe for an embedded server, or the one the user forced with `prefer`.

    It follows where the server put the model: NVML per-process when the log says layers went to the GPU (and a
    driver answers), the process tree's RSS otherwise.
    """
    if prefer in (None, "auto"):
        from kvbatch.serve.log import parse_server_log

        if parse_server_log(log_text()).on_gpu and nvml_available():
            return NvmlProcessProbe(pid)
        return ProcessRssProbe(pid)
    if prefer == "process-rss":
        return ProcessRssProbe(pid)
    if prefer == "server-log-kv":
        return ServerLogKvProbe(log_text)
    if prefer in ("nvml-process", "nvml-device"):
        if not nvml_available():
            raise UserInputError(f"memory probe {prefer!r} cannot run here: no NVIDIA GPU answers")
        return NvmlProcessProbe(pid) if prefer == "nvml-process" else NvmlDeviceProbe()
    raise UserInputError(f"unknown memory probe {prefer!r}; known probes: auto, {', '.join(PROBE_NAMES)}")
