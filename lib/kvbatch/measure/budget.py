"""Budgets mean one thing everywhere: the memory the server may use.

Given by the user (`8GiB`); by default on a GPU the card's memory x 0.9 minus what other processes hold when the
run starts (NVML), on a CPU the available RAM. `+24MiB` is the named demo for 2-core machines: the model's own
need (measured) plus that headroom. It is recorded as a demo and never overrides a user's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from kvbatch import defaults
from kvbatch.errors import UserInputError
from kvbatch.serve.probes import gpu_memory
from kvbatch.units import format_bytes, parse_bytes


@dataclass(frozen=True)
class Budget:
    bytes: int
    text: str
    """Where the figure came from, in words, for the plan and the reports."""
    kind: str
    """`user`, `gpu`, `ram` or `demo`."""
    on_gpu: bool = False
    others_bytes: int | None = None
    """GPU memory other processes held when the budget was taken."""

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"


def gpu_budget(index: int = 0, exclude_pids: set[int] | None = None) -> Budget | None:
    """The card's memory x 0.9, minus what other processes hold on it now; None without an NVIDIA GPU."""
    cards = gpu_memory(exclude_pids)
    if not cards:
        return None
    card = next((c for c in cards if c.index == index), cards[0])
    value = int(card.total_bytes * defaults.GPU_BUDGET_SHARE) - card.others_bytes
    return Budget(
        value,
        f"{format_bytes(value)} = {card.name} {format_bytes(card.total_bytes)} x {defaults.GPU_BUDGET_SHARE:.0%}"
        f" - {format_bytes(card.others_bytes)} held by other processes",
        "gpu",
        True,
        card.others_bytes,
    )


def ram_budget() -> Budget:
    available = int(psutil.virtual_memory().available)
    return Budget(available, f"{format_bytes(available)} of available RAM", "ram")


def default_budget(on_gpu: bool) -> Budget:
    return (gpu_budget() if on_gpu else None) or ram_budget()


def resolve_budget(spec: str | int | None, *, on_gpu: bool, anchor_bytes: int | None = None,
                   anchor_what: str = "") -> Budget:  # fmt: skip
    """A budget from what the user typed: None for the machine's default, `8GiB`, or `+24MiB` (the demo: the
    model's own need, `anchor_bytes`, plus headroom)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return default_budget(on_gpu)
    text = str(spec).strip()
    if text.startswith("+"):
        if anchor_bytes is None:
            raise UserInputError(f"budget {text!r} is headroom above the model's own need, which was not measured")
        headroom = parse_bytes(text[1:], what="budget headroom")
        value = anchor_bytes + headroom
        return Budget(
            value,
            f"{format_bytes(value)} = {anchor_what or 'the model'} ({format_bytes(anchor_bytes)}) + "
            f"{format_bytes(headroom)} (the 2-core demo budget)",
            "demo",
            on_gpu,
        )
    value = parse_bytes(text, what="budget")
    return Budget(value, f"{format_bytes(value)} (given)", "user", on_gpu)
