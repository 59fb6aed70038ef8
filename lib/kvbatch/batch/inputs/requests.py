"""What every input format produces: requests, the problems found while validating them, and the report the
planner reads (counts, sizes, prefixes). The checks a request body must pass live here, whatever its format.

Strict on user input: every problem is named with its file, line and field, and nothing starts until the whole
input is valid.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvbatch.batch.inputs.answers import requested_schema, response_format_problem
from kvbatch.errors import UserInputError
from kvbatch.messages import message_text

ROLES = ("system", "developer", "user", "assistant", "tool")
HASH_ALGORITHM = "sha256"
MAX_TOKENS_LIMIT = 2**31 - 1
KVBATCH_OWNED_FIELDS = ("model", "stream", "stream_options", "id_slot")
"""Body fields kvbatch sets itself: the configured model, whole (never streamed) replies, and slot pinning."""


@dataclass(frozen=True)
class BatchRequest:
    """One request to run. `prefix_key` groups requests whose messages before the last one are byte-identical."""

    custom_id: str
    body: dict[str, Any]
    line_no: int
    prefix_key: str

    @property
    def user_chars(self) -> int:
        return len(message_text(self.body["messages"][-1]) or "")

    @property
    def prompt_chars(self) -> int:
        return sum(len(message_text(m) or "") for m in self.body["messages"])


@dataclass(frozen=True)
class InputProblem:
    path: str
    line_no: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.field}: {self.reason}"


class InvalidInputError(UserInputError):
    """The input has bad lines; all of them are listed, nothing was started."""

    def __init__(self, problems: list[InputProblem], *, shown: int = 50) -> None:
        listed = "\n  ".join(str(p) for p in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        super().__init__(f"{len(problems)} problem(s) in the input; nothing was started:\n  {listed}{more}")
        self.problems = problems


@dataclass
class InputReport:
    """What a validation pass learned: counts, problems, notes, sizes for the planner, and where each prefix lives."""

    path: str
    request_count: int = 0
    problems: list[InputProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    input_hash: str = ""
    prefix_offsets: dict[str, array] = field(default_factory=dict)
    prefix_texts: dict[str, str] = field(default_factory=dict)
    user_chars: array = field(default_factory=lambda: array("i"))
    max_tokens: array = field(default_factory=lambda: array("i"))
    longest_request: tuple[str, int] = ("", 0)
    json_answers: int = 0
    """Requests whose `response_format` asks for JSON: the server builds a grammar for each, which the plan prices."""
    file_state: tuple[int, int] | None = None
    """(size, mtime_ns) of the input when it was validated: requests are read back by offset, so it must not change."""

    def raise_if_invalid(self) -> None:
        if self.problems:
            raise InvalidInputError(self.problems)

    def add(self, custom_id: str, messages: list[dict[str, Any]], body: dict[str, Any], offset: int) -> None:
        """Index one valid request: its prefix group, where it is, its size."""
        key = prefix_key(prefix_of(messages))
        if key not in self.prefix_offsets:
            self.prefix_offsets[key] = array("q")
            self.prefix_texts[key] = "\n".join(message_text(m) or "" for m in messages[:-1])
        self.prefix_offsets[key].append(offset)
        user_chars = len(message_text(messages[-1]) or "")
        self.user_chars.append(user_chars)
        self.max_tokens.append(int(body.get("max_completion_tokens") or body.get("max_tokens") or 0))
        if user_chars > self.longest_request[1]:
            self.longest_request = (custom_id, user_chars)
        self.json_answers += requested_schema(body)[0]
        self.request_count += 1

    def system_prompt_hash(self) -> str:
        return f"{HASH_ALGORITHM}:" + hashlib.sha256("".join(sorted(self.prefix_texts)).encode()).hexdigest()


def prefix_of(messages: list[dict[str, Any]]) -> str:
    """The shared prefix of a chat request: every message before the last, as the text the server caches."""
    return json.dumps(messages[:-1], ensure_ascii=False, sort_keys=True)


def prefix_key(prefix_text: str) -> str:
    return hashlib.sha256(prefix_text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def not_utf8(text: str) -> str | None:
    """Why a string cannot be written as UTF-8 (a lone surrogate such as \\ud800), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains {text[exc.start]!r} (a lone surrogate), which cannot be written as UTF-8"
    return None


def reject_constant(name: str) -> float:
    """json.loads' hook for NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TOKENS_LIMIT


def check_body(
    body: Any,
    where: tuple[str, int],
    problems: list[InputProblem],
    refused: dict[str, str] | None = None,
    accepted: frozenset[str] | None = None,
    not_sent: Counter | None = None,
    schema_keywords: dict[str, str] | None = None,
) -> list[dict[str, Any]] | None:
    """The messages of a valid chat body, or None after adding the first problem found. Fields outside `accepted`
    (when the server takes only some) are counted in `not_sent`, for a note; a `response_format` must be one whose
    answers can be checked, with no schema keyword the server refuses (`schema_keywords`)."""
    path, line_no = where

    def problem(name: str, reason: str) -> None:
        problems.append(InputProblem(path, line_no, name, reason))

    if not isinstance(body, dict):
        problem("body", "must be a JSON object")
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        problem("body.messages", "must be a non-empty list of messages")
        return None
    for index, message in enumerate(messages):
        name = f"body.messages[{index}]"
        if not isinstance(message, dict):
            problem(name, "must be an object with role and content")
            return None
        if message.get("role") not in ROLES:
            problem(f"{name}.role", f"must be one of {', '.join(ROLES)}")
            return None
        text = message_text(message)
        if text is None:
            problem(f"{name}.content", "must be a string (or a list of text parts)")
            return None
        why = not_utf8(text)
        if why:
            problem(f"{name}.content", why)
            return None
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and not _is_count(body[key]):
            problem(f"body.{key}", f"must be a whole number from 1 to {MAX_TOKENS_LIMIT}")
            return None
    if "n" in body and body["n"] != 1:
        problem("body.n", "must be 1: a batch keeps one answer per custom_id (give each wanted answer its own line)")
        return None
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):  # fmt: skip
            problem(f"body.{key}", "must be a number")
            return None
    if "response_format" in body:
        found = response_format_problem(body["response_format"], schema_keywords or {})
        if found:
            problem(*found)
            return None
    for key, reason in (refused or {}).items():
        if key in body:
            problem(f"body.{key}", reason)
            return None
    if accepted is not None and not_sent is not None:
        not_sent.update(key for key in body if key not in accepted)
    return messages


def clean_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body as it is sent: kvbatch's own fields (model, streaming, slot) are its to set."""
    return {key: value for key, value in body.items() if key not in KVBATCH_OWNED_FIELDS}
