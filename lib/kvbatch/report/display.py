"""Tables and figures that speak to a person: bytes as MiB/GiB, shares as percentages, times as clock times or
durations, counts as integers, and no pandas index column."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import pandas as pd

from kvbatch.units import format_bytes


def duration(seconds: float | None) -> str:
    if seconds is None or pd.isna(seconds):
        return "–"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def clock(unix_s: float | None) -> str:
    if unix_s is None or pd.isna(unix_s):
        return "–"
    return dt.datetime.fromtimestamp(float(unix_s)).strftime("%H:%M:%S")


def share(value: float | None) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.1%}"


def size(value: float | None) -> str:
    return "–" if value is None or pd.isna(value) else format_bytes(float(value))


def table(
    frame: pd.DataFrame,
    *,
    bytes_columns: Iterable[str] = (),
    share_columns: Iterable[str] = (),
    duration_columns: Iterable[str] = (),
    clock_columns: Iterable[str] = (),
    rename: dict[str, str] | None = None,
):
    """A styled table with the columns turned into readable text and the index hidden."""
    shown = frame.copy()
    for columns, format_one in ((bytes_columns, size), (share_columns, share), (duration_columns, duration),
                                (clock_columns, clock)):  # fmt: skip
        for column in columns:
            if column in shown:
                shown[column] = shown[column].map(format_one)
    if rename:
        shown = shown.rename(columns=rename)
    return shown.style.hide(axis="index").format(escape="html")  # answers are model output: never raw HTML


def key_values(rows: list[tuple[str, Any]]):
    """A two-column table of (what, value) rows, values already readable."""
    return table(pd.DataFrame(rows, columns=["", "value"]))


def integer_axis(axis) -> None:
    """Counts on a matplotlib axis: whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
