"""Token counts for planning and for the truncation guard: the server's own tokenizer when it has one (or the
model's own GGUF, through a short-lived embedded server, for an Ollama model on this machine); else a tiktoken
estimate, or 4 characters per token when tiktoken's encoding cannot be loaded offline."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from kvbatch import defaults
from kvbatch.batch.inputs.requests import InputReport
from kvbatch.messages import message_text
from kvbatch.serve.backends import Backend


@dataclass
class TokenCounts:
    counts: list[int]
    source: str

    @property
    def exact(self) -> bool:
        return "estimate" not in self.source

    def chars_per_token(self, texts: list[str]) -> float:
        chars = sum(len(t) for t in texts)
        tokens = sum(self.counts)
        return chars / tokens if tokens else defaults.FALLBACK_CHARS_PER_TOKEN


@functools.lru_cache(maxsize=1)
def _tiktoken_encoding():
    """tiktoken's encoding, or None: asked once per process (without a cached copy tiktoken downloads it, and a
    failed download is not cached by tiktoken, so a run without network would ask again for every estimate)."""
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base")
    except Exception:  # no cached encoding and no network: tiktoken raises requests/OS errors
        return None


def _tiktoken_counts(texts: list[str]) -> list[int] | None:
    encoding = _tiktoken_encoding()
    if encoding is None:
        return None
    return [len(encoding.encode(text, disallowed_special=())) for text in texts]


async def count_tokens(backend: Backend | None, texts: list[str], *, source: str = "server tokenizer") -> TokenCounts:
    """Exact counts from the server's tokenizer where possible; the source is recorded with the plan."""
    if backend is not None:
        counts: list[int] = []
        for text in texts:
            tokens = await backend.tokenize(text)
            if tokens is None:
                break
            counts.append(len(tokens))
        else:
            return TokenCounts(counts, source)
    estimated = _tiktoken_counts(texts)
    if estimated is not None:
        return TokenCounts(estimated, "tiktoken cl100k estimate")
    return TokenCounts([int(len(t) / defaults.FALLBACK_CHARS_PER_TOKEN) + 1 for t in texts], "4 chars/token estimate")


@dataclass
class Calibration:
    prefix_tokens: dict[str, int]
    chars_per_token: float
    source: str
    exact: bool


async def calibrate(backend: Backend | None, report: InputReport, requests_fn, *, source: str = "server tokenizer"):
    """Exact system-prompt tokens per prefix, and a chars-per-token ratio from a sample of user messages."""
    prefix_keys = list(report.prefix_texts)[:50]
    prefix_counts = await count_tokens(backend, [report.prefix_texts[k] for k in prefix_keys], source=source)
    sample = [message_text(r.body["messages"][-1]) or ""
              for r in itertools.islice(requests_fn(frozenset()), defaults.SIZE_SAMPLE)]  # fmt: skip
    user_counts = await count_tokens(backend, sample, source=source)
    return Calibration(
        dict(zip(prefix_keys, prefix_counts.counts, strict=False)),
        user_counts.chars_per_token(sample),
        user_counts.source,
        prefix_counts.exact and user_counts.exact,
    )
