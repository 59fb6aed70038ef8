"""Was a server that died of SIGKILL killed by the kernel's out-of-memory killer? Its own log cannot say (it got no
chance to), so the evidence is looked for where this machine keeps it, and named:

- the kernel log (`/dev/kmsg`, readable by root on a host and in most containers): "Killed process PID";
- the server's own memory cgroup, where kvbatch could make one (`ServerCgroup`: cgroup v1 as root, or v2 where the
  memory controller is delegated): its `oom_kill` count is the server's alone, and its peak is the memory the
  server held just before it died;
- the out-of-memory kill counter of kvbatch's own cgroup (which the server inherits): cgroup v2 `memory.events`
  `oom_kill`, or cgroup v1 `memory.oom_control` `oom_kill`, found through `/proc/self/cgroup` (a host's cgroup-v2
  root has no `memory.events`; the process's own group does);

Memory pressure (`/proc/pressure/memory`) is not evidence of a kill (it rises on a busy machine whatever killed the
server), so it is not used. A SIGKILL without any of the above is a plain kill: restarted as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
KMSG = Path("/dev/kmsg")


def _counter(path: Path, name: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


OOM_COUNTER = {1: "memory.oom_control", 2: "memory.events"}
"""The file that counts a memory cgroup's out-of-memory kills (`oom_kill`), by cgroup version."""


def _own_memory_cgroups(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> list[tuple[Path, int]]:
    """This process's memory cgroup folders (from /proc/self/cgroup unless given), with their cgroup version:
    v1's memory hierarchy first, then v2's group (or the unified hierarchy of a hybrid setup)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return []
    found = []
    for line in proc_cgroup.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.strip().lstrip("/")
        if "memory" in controllers.split(","):
            found.insert(0, (root / "memory" / relative, 1))
        elif controllers == "":
            found += [(root / relative, 2), (root / "unified" / relative, 2)]
    return [(folder, version) for folder, version in found if folder.is_dir()]


def cgroup_counter_files(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> list[Path]:
    """The files that count out-of-memory kills for this process's own cgroup, where they exist."""
    counters = [folder / OOM_COUNTER[version] for folder, version in _own_memory_cgroups(proc_cgroup, root)]
    return [counter for counter in counters if counter.exists()]


SERVER_CGROUP_PREFIX = "kvbatch-server-"


def _remove_stale(parent: Path) -> None:
    """Groups left by a kvbatch that was killed (its server died with it): named after that kvbatch's pid. A group
    that still holds a process cannot be removed, so nothing alive is touched."""
    with contextlib.suppress(OSError):
        for folder in parent.glob(f"{SERVER_CGROUP_PREFIX}*"):
            owner = folder.name.removeprefix(SERVER_CGROUP_PREFIX).split("-")[0]
            if owner.isdigit() and not psutil.pid_exists(int(owner)):
                with contextlib.suppress(OSError):
                    folder.rmdir()


@dataclass
class ServerCgroup:
    """A memory cgroup of one server's own, made under kvbatch's: the server is put in it before it runs (so all its
    memory is counted there), its out-of-memory kills are its own, and its peak is what it held before it died.
    Made only where this machine lets us (cgroup v1 as root; v2 where the memory controller is delegated to
    kvbatch's group); elsewhere `create` gives None and the other evidence is used."""

    path: Path
    version: int

    @classmethod
    def create(cls, name: str, proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> ServerCgroup | None:
        for parent, version in _own_memory_cgroups(proc_cgroup, root):
            _remove_stale(parent)
            folder = parent / name
            try:
                folder.mkdir(exist_ok=True)
            except OSError:
                continue
            if (folder / OOM_COUNTER[version]).exists() and os.access(folder / "cgroup.procs", os.W_OK):
                return cls(folder, version)
            with contextlib.suppress(OSError):
                folder.rmdir()
        return None

    @property
    def procs(self) -> str:
        """The file a process writes "0" to, to move itself here (the server does, between fork and exec)."""
        return str(self.path / "cgroup.procs")

    def oom_kills(self) -> int | None:
        return _counter(self.path / OOM_COUNTER[self.version], "oom_kill")

    def peak_bytes(self) -> int | None:
        """The most memory the server's group held (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`)."""
        try:
            name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remove(self) -> None:
        """Once the server has exited (an empty group can be removed; the kernel keeps nothing else)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()


def oom_kill_count(files: list[Path]) -> int | None:
    counts = [c for c in (_counter(f, "oom_kill") for f in files) if c is not None]
    return sum(counts) if counts else None


def boot_clock_us() -> int:
    """Microseconds since boot, the clock of the kernel log's records."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1e6)


def kernel_log_names(pid: int, kmsg: Path = KMSG, since_us: int = 0) -> str | None:
    """The kernel's own line about killing `pid` for memory since `since_us` (a pid is reused: older lines are
    about another process), when the kernel log is readable here."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = None
    pattern = re.compile(rf"(Killed process {pid}\b|oom-kill:.*\bpid={pid}\b)")
    with contextlib.closing(os.fdopen(fd, "rb", buffering=0)) as stream:
        while True:
            try:
                record = stream.read(8192)  # one record per read
            except BlockingIOError:  # no more records
                break
            except BrokenPipeError:  # records overwritten while reading: go on with the next
                continue
            except OSError:
                break
            if not record:
                break
            text = record.decode("utf-8", "replace")
            header, _, message = text.partition(";")
            fields = header.split(",")  # priority, sequence, microseconds since boot, flags
            stamp = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            if stamp >= since_us and pattern.search(message):
                found = message.strip()
    return found


@dataclass
class OomWatch:
    """What the counters said when a server started, to compare with after it died."""

    files: list[Path]
    kills_at_start: int | None
    started_us: int
    kmsg: Path = KMSG

    @classmethod
    def now(cls, files: list[Path] | None = None, kmsg: Path = KMSG) -> OomWatch:
        files = cgroup_counter_files() if files is None else files
        return cls(files, oom_kill_count(files), boot_clock_us(), kmsg)

    def evidence(self, pid: int | None, returncode: int | None, cgroup: ServerCgroup | None = None) -> str | None:
        """Why a server that died with SIGKILL is taken to have been killed for memory (every source that says so,
        named), or None. `cgroup`: the server's own (its kills are the server's alone, counted from 0)."""
        if pid is None or returncode != -9:
            return None
        found = []
        line = kernel_log_names(pid, self.kmsg, self.started_us)
        if line:
            found.append(f"the kernel log: {line}")
        own = cgroup.oom_kills() if cgroup is not None else None
        if own:
            found.append(f"the server's own cgroup counted {own} out-of-memory kill(s) ({cgroup.path})")
        kills = oom_kill_count(self.files)
        if kills is not None and self.kills_at_start is not None and kills > self.kills_at_start:
            where = ", ".join(str(f) for f in self.files)
            found.append(f"the cgroup's out-of-memory kill count rose from {self.kills_at_start} to {kills} ({where})")
        return "; ".join(found) or None
