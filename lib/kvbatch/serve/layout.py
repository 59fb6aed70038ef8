"""The shape of a server: how many slots it runs and the context of each. A value, never changed in place: the plan
holds the layout it planned, and each server's supervisor holds the one its server runs with now, which a back-off
replaces and reports in its `Recovery` (the executor's capacity and the report read it there), so no part of a run
can change what another holds."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SlotLayout:
    slots: int
    slot_context_tokens: int

    @property
    def total_context_tokens(self) -> int:
        """What llama-server takes as `--ctx-size` (it gives each of `--parallel` slots an equal share), and what
        Ollama allocates for `num_ctx` x OLLAMA_NUM_PARALLEL."""
        return self.slots * self.slot_context_tokens

    def with_slots(self, slots: int) -> SlotLayout:
        return replace(self, slots=slots)

    def with_slot_context(self, slot_context_tokens: int) -> SlotLayout:
        return replace(self, slot_context_tokens=slot_context_tokens)

    def describe(self) -> str:
        return f"{self.slots} slot(s) x {self.slot_context_tokens} tokens"
