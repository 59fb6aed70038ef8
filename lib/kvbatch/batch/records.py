"""The run folder's line formats, each read and written here: the JSON-lines files (results, errors, metrics,
events), read the way the journal writes them (a lone surrogate kept, a torn last line skipped), and the memory
samples (memory.csv) as typed records. Every reader (the report, the API, the CLI) goes through these."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMORY_HEADER = "t_unix_s,used_bytes,probe,endpoint"
_TAIL_BYTES = 256
"""Enough of memory.csv's end for its last line (a sample is under 100 bytes)."""


def jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """Each whole line of a JSON-lines file of the run folder, as written (a torn last line, cut by a crash and
    repaired on the next resume, is skipped)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="surrogatepass") as handle:  # the journal keeps a lone surrogate
        for line in handle:
            if line.endswith("\n"):
                yield json.loads(line)


@dataclass(frozen=True)
class MemorySample:
    """One line of memory.csv: the server's memory at a moment, by which probe, on which endpoint."""

    t_unix_s: float
    used_bytes: int
    probe: str
    endpoint: str = ""

    def line(self) -> str:
        return f"{self.t_unix_s:.3f},{self.used_bytes},{self.probe},{self.endpoint}\n"

    @classmethod
    def parse(cls, line: str) -> MemorySample | None:
        fields = line.strip().split(",")
        if len(fields) < 3 or not fields[1].isdigit():
            return None  # the header, or a line cut by a crash
        return cls(float(fields[0]), int(fields[1]), fields[2], fields[3] if len(fields) > 3 else "")


def append_memory_sample(path: Path, used_bytes: int, probe: str, endpoint: str) -> None:
    """One sample at the end of memory.csv (its header first, when the file is new)."""
    new_file = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        if new_file:
            handle.write(MEMORY_HEADER + "\n")
        handle.write(MemorySample(time.time(), used_bytes, probe, endpoint).line())


def last_memory_sample(path: Path) -> MemorySample | None:
    """memory.csv's latest sample, read from its end (the file grows for the whole run)."""
    if not path.exists():
        return None
    with open(path, "rb") as handle:
        handle.seek(max(path.stat().st_size - _TAIL_BYTES, 0))
        last = handle.read().splitlines()[-1:]
    return MemorySample.parse(last[0].decode(errors="replace")) if last else None
