"""The answer a request asked for, checked before it counts: a request whose `response_format` asks for JSON
(`json_object`, or `json_schema` with a schema) is a success only when its answer parses and, for a schema, validates
(the `jsonschema` library). Servers do not always keep to it: llama.cpp has answered 200 without enforcing a schema,
Ollama returns schema-invalid values on some models, and a JSON answer cut off by `max_tokens` does not parse.

An invalid answer is not a server fault (the server served): it is asked again, with another seed (and, at
temperature 0, a little temperature, or the same answer comes back) and after a cut a larger `max_tokens` within the
slot's room, up to `--answer-attempts`; then it fails for good with the validation error and the last answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from kvbatch import defaults, jsoncodec
from kvbatch.errors import KvbatchError, UserInputError

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class InvalidAnswerError(KvbatchError):
    """The answer broke the request's own contract (not JSON, or not its schema) after every attempt allowed."""


@dataclass(frozen=True)
class AnswerProblem:
    """Why one answer is not what its request asked for."""

    kind: str
    """`not_json`, `cut` (not JSON because it reached max_tokens), or `schema`."""
    path: str
    """Where in the answer, as a JSON path (`$`, `$.decision`, `$.scores[2]`)."""
    message: str

    def describe(self) -> str:
        return f"{self.path}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "message": self.message}


def json_path(parts: Iterator[Any] | list[Any]) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def requested_schema(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(whether the body asks for JSON, the schema it gives or None)."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return False, None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return True, schema if isinstance(schema, dict) else None
    return kind == "json_object", None


def schema_problem(schema: Any) -> str | None:
    """Why a schema cannot check answers (not an object, or not valid for its own draft), or None."""
    if not isinstance(schema, dict):
        return "must be a JSON Schema object"
    try:
        validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message} (at {json_path(exc.absolute_path)})"
    return None


def refused_keywords(schema: Any, refused: dict[str, str], path: str = "schema") -> list[tuple[str, str]]:
    """Every place in `schema` that uses a keyword the server refuses: (where, why)."""
    found: list[tuple[str, str]] = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in refused:
                found.append((f"{path}.{key}", refused[key]))
            if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas") and (
                    isinstance(value, dict)):  # fmt: skip
                for name, sub in value.items():  # the names here are the answer's fields, not keywords
                    found.extend(refused_keywords(sub, refused, f"{path}.{key}.{name}"))
            elif key not in ("enum", "const", "default", "examples"):
                found.extend(refused_keywords(value, refused, f"{path}.{key}"))
    elif isinstance(schema, list):
        for index, item in enumerate(schema):
            found.extend(refused_keywords(item, refused, f"{path}[{index}]"))
    return found


def response_format_problem(response_format: Any, refused: dict[str, str]) -> tuple[str, str] | None:
    """(field, why) for a `response_format` a batch cannot honour or check, or None."""
    if not isinstance(response_format, dict) or response_format.get("type") not in RESPONSE_FORMATS:
        return "body.response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}"
    if response_format["type"] != "json_schema":
        return None
    given = response_format.get("json_schema")
    if not isinstance(given, dict) or "schema" not in given:
        return "body.response_format.json_schema", "must be an object with `name` and `schema`"
    why = schema_problem(given["schema"])
    if why:
        return "body.response_format.json_schema.schema", why
    found = refused_keywords(given["schema"], refused)
    if found:
        where, reason = found[0]
        return f"body.response_format.json_schema.{where}", reason
    return None


def load_schema_file(path: Path, refused: dict[str, str]) -> dict[str, Any]:
    """`--schema FILE` (a JSON Schema for every row of a table input) as the `response_format` each request sends."""
    try:
        schema = json.loads(Path(path).read_text("utf-8-sig"))
    except FileNotFoundError as exc:
        raise UserInputError(f"schema file not found: {path}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: not a JSON file ({exc})") from exc
    why = schema_problem(schema)
    if why:
        raise UserInputError(f"{path}: {why}")
    found = refused_keywords(schema, refused)
    if found:
        where, reason = found[0]
        raise UserInputError(f"{path}: {where}: {reason}")
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(path).stem)[:64] or "answer"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


class AnswerContract:
    """What one request's answer must be: JSON, and valid against its schema when it gives one."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self.schema = schema
        self._validator = validator_for(schema, default=jsonschema.Draft202012Validator)(schema) if schema else None

    def check(self, text: str, finish_reason: str | None) -> AnswerProblem | None:
        try:
            value = jsoncodec.loads(text)
        except (json.JSONDecodeError, ValueError) as exc:
            kind = "cut" if finish_reason == "length" else "not_json"
            reason = "cut off at max_tokens before the JSON ended" if kind == "cut" else "not JSON"
            return AnswerProblem(kind, "$", f"{reason} ({str(exc).splitlines()[0][:120]})")
        if self._validator is None:
            return None
        try:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        except Exception as exc:  # noqa: BLE001 (an unresolvable $ref, an unknown format: the schema's fault)
            return AnswerProblem("schema", "$", f"the schema cannot be applied: {type(exc).__name__}: {exc}"[:300])
        if error is None:
            return None
        return AnswerProblem("schema", json_path(error.absolute_path), error.message[:300])


class AnswerContracts:
    """One contract per distinct schema (a batch of 170,000 requests carries one or a few), made once."""

    def __init__(self) -> None:
        self._made: dict[str, AnswerContract] = {}

    def of(self, body: dict[str, Any]) -> AnswerContract | None:
        wants_json, schema = requested_schema(body)
        if not wants_json:
            return None
        key = jsoncodec.dumps(schema).decode() if schema else ""
        contract = self._made.get(key)
        if contract is None:
            contract = self._made[key] = AnswerContract(schema)
        return contract


MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens")


def ask_again(body: dict[str, Any], attempt: int, problem: AnswerProblem, *, prompt_tokens: int | None,
              slot_context_tokens: int | None) -> dict[str, Any] | None:  # fmt: skip
    """The body for the next attempt: another seed (and some temperature where there was none: greedy decoding
    gives the same answer whatever the seed); after a cut, twice the answer room, within what the slot holds.
    None when a cut answer has no more room to grow (asking again at the same max_tokens would be cut again)."""
    again = dict(body)
    again["seed"] = int(body.get("seed") or 0) + attempt * 7919
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    if not body.get("temperature") and not options.get("temperature"):
        again["temperature"] = defaults.ANSWER_RETRY_TEMPERATURE
    if problem.kind == "cut":
        keys = [key for key in MAX_TOKENS_KEYS if key in body] or ["max_tokens"]
        current = max(int(body.get(key) or defaults.DEFAULT_MAX_TOKENS) for key in keys)
        room = slot_context_tokens - prompt_tokens if slot_context_tokens and prompt_tokens else None
        grown = current * 2 if room is None else min(current * 2, room)
        if grown <= current:
            return None
        for key in keys:
            again[key] = grown
    return again


def invalid_answer(problem: AnswerProblem, text: str, finish_reason: str | None, attempts: int, *,
                   no_room: bool = False) -> InvalidAnswerError:  # fmt: skip
    why = (f"it was cut off at max_tokens with no more room in the slot after {attempts} attempt(s)" if no_room
           else f"after {attempts} attempt(s) (--answer-attempts)")  # fmt: skip
    return InvalidAnswerError(
        f"the answer did not keep to the request's response_format: {why}: {problem.describe()}",
        details={"validation": problem.as_dict(), "last_answer": text, "finish_reason": finish_reason,
                 "answer_attempts": attempts},  # fmt: skip
    )
