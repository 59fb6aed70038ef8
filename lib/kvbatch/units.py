"""Byte sizes as people type them ("1.5GiB", "800M") and as they read them."""

from __future__ import annotations

import re

from kvbatch.errors import UserInputError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip


def parse_bytes(text: str | int | float, *, what: str = "size") -> int:
    """'1.5GiB' -> 1610612736. Bare K/M/G are binary, as in `ulimit` and `free -h`."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UserInputError(f"{what}: cannot read {text!r} as a size; write it like 1.5GiB, 800MiB or 2G")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    """1610612736 -> '1.50 GiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
