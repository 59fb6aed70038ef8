"""Answers checked against the request's own response_format: a server double that answers prose, JSON with a
field missing and JSON cut short; the real embedded server enforcing a schema (its grammar) on a table input with
`--schema`, exported to CSV and Parquet and read back; and what a server refuses named before the first request."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from aiohttp import web
from background import OpenAIDouble
from batch_helpers import kvbatch
from kvbatch.batch.inputs.answers import AnswerProblem, ask_again, load_schema_file, refused_keywords
from kvbatch.batch.inputs.openai_batch import scan_openai_batch
from kvbatch.errors import UserInputError
from kvbatch.results import load_results
from kvbatch.serve.backends.ollama_native import OllamaBackend

SCHEMA = {
    "type": "object",
    "properties": {
        "decision": {"type": "string", "enum": ["advance", "hold"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 5},
        "remote": {"type": "boolean"},
    },
    "required": ["decision", "score", "remote"],
    "additionalProperties": False,
}
VALID = {"decision": "hold", "score": 3, "remote": True}


class SloppyServer(OpenAIDouble):
    """An OpenAI-compatible server that keeps to the schema only sometimes, as llama.cpp and Ollama have: by the
    word in the user message, the first answer is prose, JSON with a field missing, or JSON cut off at a small
    max_tokens (`finish_reason: length`); a request asked again (with a seed) is answered right, except `never`."""

    model = "sloppy"

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict] = []

    def answer(self, body: dict) -> tuple[str, str]:
        kind = body["messages"][-1]["content"].split()[0]
        asked_again = "seed" in body
        if kind == "cut" and body.get("max_tokens", 0) < 100:
            return json.dumps(VALID)[:18], "length"
        if kind == "never" or (not asked_again and kind == "prose"):
            return "The candidate looks strong; I would advance them.", "stop"
        if not asked_again and kind == "missing":
            return json.dumps({"decision": "advance", "score": 4}), "stop"
        return json.dumps(VALID), "stop"

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        text, finish = self.answer(body)
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": "sloppy",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32},
        })  # fmt: skip


def _batch(path, kinds: list[str]):
    response_format = {"type": "json_schema", "json_schema": {"name": "screen", "schema": SCHEMA}}
    with open(path, "w", encoding="utf-8") as handle:
        for index, kind in enumerate(kinds):
            body = {"messages": [{"role": "system", "content": "Screen the candidate."},
                                 {"role": "user", "content": f"{kind} candidate {index}"}],
                    "max_tokens": 40, "temperature": 0, "response_format": response_format}  # fmt: skip
            handle.write(json.dumps({"custom_id": f"{kind}-{index}", "body": body}) + "\n")
    return path


def test_invalid_answers_are_asked_again_and_never_recorded_as_successes(tmp_path):
    kinds = ["ok", "prose", "missing", "cut", "never", "ok"]
    with SloppyServer() as server:
        result = kvbatch("run", str(_batch(tmp_path / "in.jsonl", kinds)), "--url", server.url, "--run", "sloppy",
                         "--no-progress", "--no-report", "--concurrency", "2", "--answer-attempts", "3",
                         cwd=tmp_path)  # fmt: skip
        bodies = server.bodies
    assert result.returncode == 1, result.stderr  # some failed for good
    frame = load_results(tmp_path / "data" / "runs" / "sloppy")
    done = frame[frame.status == "completed"].set_index("custom_id")
    assert sorted(done.index) == ["cut-3", "missing-2", "ok-0", "ok-5", "prose-1"]
    assert all(json.loads(answer) == VALID for answer in done.answer)  # nothing invalid counts as a success
    assert done.loc["ok-0", "answer_attempts"] == 1 and done.loc["prose-1", "answer_attempts"] == 2
    assert (done.decision == "hold").all() and (done.score == 3).all()
    cut = [b for b in bodies if b["messages"][-1]["content"].startswith("cut")]
    assert [b["max_tokens"] for b in cut] == [40, 80, 160]  # a cut answer gets twice the room each time
    again = [b for b in bodies if "seed" in b]
    assert again and all(b["temperature"] > 0 for b in again)  # greedy decoding would answer the same again
    errors = [json.loads(line) for line in (tmp_path / "data" / "runs" / "sloppy" / "errors.jsonl").open()]
    assert [e["custom_id"] for e in errors] == ["never-4"]
    error = errors[0]["error"]
    assert error["code"] == "InvalidAnswerError" and error["validation"]["kind"] == "not_json"
    assert error["last_answer"].startswith("The candidate looks strong")
    summary = json.loads((tmp_path / "data" / "runs" / "sloppy" / "summary.json").read_text())
    assert summary["answers_checked"] == 6 and summary["answers_valid_at_first_attempt"] == 2
    assert summary["invalid_answers"] == {"not_json": 4, "schema": 1, "cut": 2}
    assert summary["answers_cut_at_max_tokens"] == 2
    assert summary["per_endpoint"][0]["retries"] == 0  # an invalid answer is no server fault: nothing retried


def test_a_schema_the_server_refuses_or_that_is_broken_is_named_before_the_first_request(tmp_path):
    path = tmp_path / "in.jsonl"
    _batch(path, ["ok"])
    with_defs = {**SCHEMA, "$defs": {"score": {"type": "integer"}}}
    broken = {**SCHEMA, "properties": {"score": {"type": "integr"}}}
    lines = path.read_text().splitlines()
    for schema in (with_defs, broken):
        record = json.loads(lines[0])
        record["custom_id"] += str(len(lines))
        record["body"]["response_format"]["json_schema"]["schema"] = schema
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    report = scan_openai_batch(path, schema_keywords=OllamaBackend.refused_schema_keywords)
    problems = [str(p) for p in report.problems]
    assert problems[0].endswith(":2: body.response_format.json_schema.schema.$defs: Ollama refuses `$defs` in a "
                                "format schema: write the definitions inline")  # fmt: skip
    assert ":3: body.response_format.json_schema.schema: not a valid JSON Schema" in problems[1]
    assert "properties.score.type" in problems[1]
    assert len(scan_openai_batch(path).problems) == 1  # llama-server takes $defs: only the broken schema
    field_named_pattern = {"type": "object", "properties": {"pattern": {"type": "string"}}}
    assert refused_keywords(field_named_pattern, OllamaBackend.refused_schema_keywords) == []  # a field, no keyword
    schema_file = tmp_path / "screen.json"
    schema_file.write_text(json.dumps({**SCHEMA, "properties": {"name": {"type": "string", "pattern": "^[A-Z]"}}}))
    with pytest.raises(UserInputError, match=r"screen.json: schema.properties.name.pattern: Ollama refuses"):
        load_schema_file(schema_file, OllamaBackend.refused_schema_keywords)


def test_a_table_input_with_a_schema_is_answered_by_the_real_server_and_exports_as_a_table(tmp_path):
    """The embedded llama-server enforces the schema with its grammar; the export has one row per id, the schema's
    fields as columns and the table's own columns joined back, and CSV and Parquet read back equal the results."""
    table = tmp_path / "candidates.csv"
    rows = {"ref": ["a-1", "b-2", "c-3"], "name": ["Ada", "Bo", "Cy"],
            "summary": ["9 years of Go", "2 years of SQL", "5 years of Rust"]}  # fmt: skip
    pd.DataFrame(rows).to_csv(table, index=False)
    (tmp_path / "system.txt").write_text("You screen candidates for a backend role. Answer in JSON only.")
    (tmp_path / "screen.json").write_text(json.dumps(SCHEMA))
    result = kvbatch("run", str(table), "--system-prompt", "system.txt", "--template", "{name}: {summary}",
                     "--id-column", "ref", "--schema", "screen.json", "--max-tokens", "60", "--run", "table",
                     "--no-progress", "--concurrency", "1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "reports" / "run-table.html").read_text()
    answers = html[html.index("The answers"):html.index("A few answers")]
    assert "3 request(s) asked for JSON" in answers and "kept to it at the first attempt" in answers
    assert answers.count("data:image/png") == 1  # the bar charts of decision, score and remote
    run = tmp_path / "data" / "runs" / "table"
    frame = load_results(run)
    assert sorted(frame.custom_id) == ["a-1", "b-2", "c-3"] and (frame.status == "completed").all()
    assert set(frame.decision) <= {"advance", "hold"} and frame.score.between(0, 5).all()
    assert frame.remote.isin([True, False]).all()
    assert list(frame.set_index("custom_id").loc[["a-1", "c-3"], "name"]) == ["Ada", "Cy"]  # the input's columns
    table_at_end = run / "answers.csv"  # the run ends with its table and each field's counts, as the report charts
    assert f"answers: 3 rows in {table_at_end.relative_to(tmp_path)}" in result.stdout
    decisions = frame.decision.value_counts().sort_index()
    assert "  decision: " + ", ".join(f"{v} {n}" for v, n in decisions.items()) in result.stdout.splitlines()
    assert pd.read_csv(table_at_end).custom_id.tolist() == frame.custom_id.tolist()
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"answers.{fmt}"
        exported = kvbatch("export", str(run), "--out", str(out), cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr
        back = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
        assert list(back.columns) == list(frame.columns)
        for column in ("custom_id", "answer", "decision", "name", "completion_tokens", "score", "remote"):
            assert back[column].tolist() == frame[column].tolist(), (fmt, column)


def test_a_cut_answer_is_asked_again_with_more_room_until_the_slot_has_none():
    cut = AnswerProblem("cut", "$", "cut off")
    body = {"messages": [], "max_tokens": 300, "max_completion_tokens": 300, "temperature": 0}
    again = ask_again(body, 1, cut, prompt_tokens=3000, slot_context_tokens=3584)
    assert again["max_tokens"] == again["max_completion_tokens"] == 584  # within the slot's room, both keys
    assert again["temperature"] > 0 and again["seed"] != body.get("seed")
    assert ask_again(again, 2, cut, prompt_tokens=3000, slot_context_tokens=3584) is None  # no room left
    kept = ask_again({"messages": [], "options": {"temperature": 0.2}}, 1, AnswerProblem("schema", "$.a", "x"),
                     prompt_tokens=None, slot_context_tokens=None)  # fmt: skip
    assert "temperature" not in kept  # Ollama's own options.temperature stays the user's
