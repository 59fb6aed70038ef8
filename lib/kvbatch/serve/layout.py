"""The shape of a server: how many slots it runs and the context of each. One object per server, shared by the
plan, the supervisor (which shrinks it after an out-of-memory) and the executor and backends (which read it), so no
part of a run holds a stale copy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SlotLayout:
    slots: int
    slot_context_tokens: int

    @property
    def total_context_tokens(self) -> int:
        """What llama-server takes as `--ctx-size` (it gives each of `--parallel` slots an equal share), and what
        Ollama allocates for `num_ctx` x OLLAMA_NUM_PARALLEL."""
        return self.slots * self.slot_context_tokens

    def describe(self) -> str:
        return f"{self.slots} slot(s) x {self.slot_context_tokens} tokens"
