"""The truncation guard: a reply whose prompt token count is more than 10 % below the request's known size was cut
by the server (Ollama does so silently unless `truncate: false`, and older servers ignore that), so it is not a
success.

The known size is the exact prefix (system prompt) tokens where the server (or the model's own GGUF) tokenizes,
plus the message at a calibrated characters-per-token ratio. Without a tokenizer, the ratio is learned from the
server's own counts on the first replies (their median, which one cut reply cannot move); until then only a cut
below what even a generous 6 characters per token allows is caught. It must not fire on estimation error.
"""

from __future__ import annotations

import statistics

from kvbatch import defaults
from kvbatch.batch.inputs.requests import BatchRequest
from kvbatch.errors import TruncatedPromptError
from kvbatch.serve.backends import ChatResult


class TruncationGuard:
    def __init__(
        self,
        prefix_tokens: dict[str, int],
        chars_per_token: float | None,
        *,
        exact: bool,
        tolerance: float = defaults.TRUNCATION_TOLERANCE,
    ) -> None:
        self.prefix_tokens = prefix_tokens
        self.chars_per_token = chars_per_token if exact else None
        self.exact = exact
        self.tolerance = tolerance
        self._observed: list[float] = []

    def expected_tokens(self, request: BatchRequest) -> int:
        if self.exact and self.chars_per_token and request.prefix_key in self.prefix_tokens:
            return self.prefix_tokens[request.prefix_key] + int(request.user_chars / self.chars_per_token)
        ratio = self.chars_per_token or defaults.GENEROUS_CHARS_PER_TOKEN
        return int(request.prompt_chars / ratio)

    def check(self, request: BatchRequest, result: ChatResult) -> TruncatedPromptError | None:
        counted = result.prompt_tokens
        if counted is None:
            return None  # the server does not say: nothing to compare
        if result.prompt_tokens_exclude_cached:
            counted += self._most_cached(request)  # like with like: at most the shared prefix came from the cache
        elif not self.exact and counted > 0:
            self._calibrate(request.prompt_chars / counted)
        expected = self.expected_tokens(request)
        if counted >= expected * (1 - self.tolerance):
            return None
        return TruncatedPromptError(
            f"the server counted {counted} prompt tokens for a request of about {expected}: it cut the prompt "
            f"(more than {self.tolerance:.0%} short); raise the context (--slot-ctx) or shorten the request",
            details={"prompt_tokens": counted, "expected_prompt_tokens": expected},
        )

    def _most_cached(self, request: BatchRequest) -> int:
        """The most tokens a request can have had from the prefix cache: its shared prefix (every message before
        its own), exactly where it was tokenized, else at 2 characters a token (more than any tokenizer gives)."""
        if request.prefix_key in self.prefix_tokens:
            return self.prefix_tokens[request.prefix_key]
        return (request.prompt_chars - request.user_chars) // 2

    def _calibrate(self, chars_per_token: float) -> None:
        if len(self._observed) < defaults.CALIBRATION_REPLIES:
            self._observed.append(chars_per_token)
            if len(self._observed) >= 3:
                # the median of what was seen; a cut reply shows as a high ratio and cannot move it far
                self.chars_per_token = statistics.median(self._observed) * 1.05
