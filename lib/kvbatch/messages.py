"""The text of a chat message, as every part of kvbatch reads it (the input's validation, the token sizes, the
Ollama backend): a string, or OpenAI's list of text parts joined."""

from __future__ import annotations

from typing import Any


def content_text(content: Any) -> str | None:
    """A message's `content` as text; None for anything else (an image part, a number, nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def message_text(message: dict[str, Any]) -> str | None:
    """A message's text (see `content_text`)."""
    return content_text(message.get("content"))
