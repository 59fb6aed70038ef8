"""Token counts for planning: the server's own tokenizer when it has one; else a tiktoken estimate (or 4 chars per
token when tiktoken's encoding cannot be loaded offline), to be calibrated against the server's prompt counts."""

from __future__ import annotations

from dataclasses import dataclass

from kvbatch.backends import Backend

FALLBACK_CHARS_PER_TOKEN = 4.0


@dataclass
class TokenCounts:
    counts: list[int]
    source: str

    def chars_per_token(self, texts: list[str]) -> float:
        chars = sum(len(t) for t in texts)
        tokens = sum(self.counts)
        return chars / tokens if tokens else FALLBACK_CHARS_PER_TOKEN


def _tiktoken_counts(texts: list[str]) -> list[int] | None:
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:  # no cached encoding and no network: tiktoken raises requests/OS errors
        return None
    return [len(encoding.encode(text, disallowed_special=())) for text in texts]


async def count_tokens(backend: Backend | None, texts: list[str]) -> TokenCounts:
    """Exact counts from the server's tokenizer where possible; the source is recorded with the plan."""
    if backend is not None:
        counts: list[int] = []
        for text in texts:
            tokens = await backend.tokenize(text)
            if tokens is None:
                break
            counts.append(len(tokens))
        else:
            return TokenCounts(counts, "server tokenizer")
    estimated = _tiktoken_counts(texts)
    if estimated is not None:
        return TokenCounts(estimated, "tiktoken cl100k estimate")
    return TokenCounts([int(len(t) / FALLBACK_CHARS_PER_TOKEN) + 1 for t in texts], "4 chars/token estimate")
