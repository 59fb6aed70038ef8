"""The token sizes of a batch, for the plan: from the input scan's character counts and a characters-per-token
ratio calibrated on the server's own tokenizer (or an estimate, said so)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvbatch import defaults
from kvbatch.batch.inputs.requests import InputReport


@dataclass
class SizeProfile:
    """Token sizes of the batch, from the input scan and the server's tokenizer (or a calibrated estimate)."""

    request_count: int
    system_prompt_tokens: int
    prefix_count: int
    user_tokens_p50: int
    user_tokens_p99: int
    max_tokens_p99: int
    max_tokens_mean: float
    longest_request_id: str
    longest_request_tokens: int
    chars_per_token: float
    token_source: str
    json_answers: int = 0
    """Requests asking for a JSON answer (a grammar per request on llama-server, priced by the plan)."""

    @property
    def request_tokens_p99(self) -> int:
        """System prompt, the p99 message and its answer, with the chat template's markers."""
        return (
            self.system_prompt_tokens
            + defaults.CHAT_TEMPLATE_TOKENS_PER_MESSAGE
            + self.user_tokens_p99
            + self.max_tokens_p99
        )

    def conversation_turns(self, slot_context: int) -> int:
        """How many requests one conversation holds after the system prompt, at the p99 turn size."""
        per_message = defaults.CHAT_TEMPLATE_TOKENS_PER_MESSAGE
        turn = per_message * 2 + self.user_tokens_p99 + self.max_tokens_p99
        return max(1, int((slot_context - self.system_prompt_tokens - per_message) // turn))


def size_profile(
    report: InputReport,
    system_prompt_tokens: int,
    chars_per_token: float,
    token_source: str,
    default_max_tokens: int = defaults.DEFAULT_MAX_TOKENS,
) -> SizeProfile:
    """Turn the input scan's character counts into token figures with a calibrated chars-per-token ratio."""
    per_message = defaults.CHAT_TEMPLATE_TOKENS_PER_MESSAGE
    chars = np.frombuffer(report.user_chars, dtype=np.int32) if len(report.user_chars) else np.zeros(1, np.int32)
    max_tokens = np.frombuffer(report.max_tokens, dtype=np.int32) if len(report.max_tokens) else np.zeros(1, np.int32)
    max_tokens = np.where(max_tokens > 0, max_tokens, default_max_tokens)
    user_tokens = np.ceil(chars / chars_per_token) + per_message
    longest_id, longest_chars = report.longest_request
    return SizeProfile(
        request_count=report.request_count,
        system_prompt_tokens=system_prompt_tokens,
        prefix_count=max(len(report.prefix_offsets), 1),
        user_tokens_p50=int(np.percentile(user_tokens, 50)),
        user_tokens_p99=int(np.percentile(user_tokens, 99)),
        max_tokens_p99=int(np.percentile(max_tokens, 99)),
        max_tokens_mean=float(max_tokens.mean()),
        longest_request_id=longest_id,
        longest_request_tokens=system_prompt_tokens
        + int(math.ceil(longest_chars / chars_per_token))
        + 2 * per_message
        + int(max_tokens.max()),
        chars_per_token=chars_per_token,
        token_source=token_source,
        json_answers=report.json_answers,
    )
