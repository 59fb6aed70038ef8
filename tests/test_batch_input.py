"""Bad input gets one clear message per problem (file, line, field), all at once, and nothing starts."""

from __future__ import annotations

import json

import pytest
from batch_helpers import kvbatch, replace_user_message, small_batch
from kvbatch.batch.inputs.openai_batch import iter_openai_batch, scan_openai_batch
from kvbatch.batch.inputs.table import TableInput

GOOD = {
    "custom_id": "a",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
}


def _line(**changes) -> str:
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    return json.dumps(record)


BAD_LINES = [
    ("invalid JSON", '{"custom_id": "x", "body": ', "(line): invalid JSON: Expecting value at column 28"),
    ("missing custom_id", _line(custom_id=None), "custom_id: missing or not a non-empty string"),
    ("duplicate custom_id", _line(custom_id="a"), "custom_id: duplicate 'a' (first on line 1)"),
    (
        "empty messages",
        _line(custom_id="em", body={"messages": []}),
        "body.messages: must be a non-empty list of messages",
    ),
    (
        "malformed message",
        _line(custom_id="m", body={"messages": [{"role": "user"}]}),
        "body.messages[0].content: must be a string (or a list of text parts)",
    ),
    (
        "bad role",
        _line(custom_id="r", body={"messages": [{"role": "robot", "content": "x"}]}),
        "body.messages[0].role: must be one of system, developer, user, assistant, tool",
    ),
    ("unsupported method", _line(custom_id="g", method="GET"), "method: 'GET' is not supported; use POST"),
    (
        "unsupported url",
        _line(custom_id="e", url="/v1/embeddings"),
        "url: '/v1/embeddings' is not supported; use /v1/chat/completions",
    ),
    (
        "lone surrogate in a system message",
        '{"custom_id": "s", "body": {"messages": [{"role": "system", "content": "bad \\ud800"}, '
        '{"role": "user", "content": "u"}]}}',
        "body.messages[0].content: contains '\\ud800' (a lone surrogate), which cannot be written as UTF-8",
    ),
    (
        "lone surrogate in a custom_id",
        '{"custom_id": "id\\udc80", "body": {"messages": [{"role": "user", "content": "u"}]}}',
        "custom_id: contains '\\udc80' (a lone surrogate), which cannot be written as UTF-8",
    ),
    (
        "max_tokens past 2^31",
        _line(custom_id="big", body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2**31}),
        "body.max_tokens: must be a whole number from 1 to 2147483647",
    ),
    (
        "max_tokens true",
        _line(custom_id="t", body={"messages": [{"role": "user", "content": "x"}], "max_tokens": True}),
        "body.max_tokens: must be a whole number from 1 to 2147483647",
    ),
    (
        "NaN temperature",
        '{"custom_id": "nan", "body": {"messages": [{"role": "user", "content": "x"}], "temperature": NaN}}',
        "(line): NaN is not valid JSON",
    ),
    (
        "deeply nested JSON",
        '{"custom_id": "deep", "body": ' + "[" * 100000 + "]" * 100000 + "}",
        "(line): JSON nested too deeply to read",
    ),
    (
        "several answers",
        _line(custom_id="n", body={"messages": [{"role": "user", "content": "x"}], "n": 3}),
        "body.n: must be 1: a batch keeps one answer per custom_id (give each wanted answer its own line)",
    ),
]


@pytest.mark.parametrize(("kind", "bad", "message"), BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_each_bad_line_kind_is_named_with_file_line_and_field(tmp_path, kind, bad, message):
    path = tmp_path / "in.jsonl"
    path.write_text(_line() + "\n" + bad + "\n")
    report = scan_openai_batch(path)
    assert [str(p) for p in report.problems] == [f"{path}:2: {message}"]


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(_line().encode() + b"\n" + b'{"custom_id": "caf\xe9"}\n')
    report = scan_openai_batch(path)
    assert [str(p) for p in report.problems] == [f"{path}:2: (line): not UTF-8: byte 0xe9 at column 19"]


def test_all_problems_at_once_and_nothing_starts(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([_line()] + [bad for _, bad, _ in BAD_LINES]) + "\n")
    result = kvbatch("run", str(path), "--run", "bad", "--no-report", cwd=tmp_path)
    assert result.returncode == 2
    assert f"kvbatch run: {len(BAD_LINES)} problem(s) in the input; nothing was started:" in result.stderr
    for _, _, message in BAD_LINES:
        assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "runs" / "bad").exists()


def test_foreign_model_and_stream_are_reported_not_fatal(tmp_path):
    path = tmp_path / "in.jsonl"
    body = dict(GOOD["body"], model="gpt-4o-mini", stream=True)
    path.write_text(_line(body=body) + "\n")
    report = scan_openai_batch(path)
    assert not report.problems
    assert any("'gpt-4o-mini' (1)" in note for note in report.notes)
    assert any("stream: true" in note for note in report.notes)
    (request,) = list(iter_openai_batch(report))
    assert "model" not in request.body and "stream" not in request.body


def test_empty_input_is_a_clean_no_op(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    result = kvbatch("run", str(path), "--no-report", cwd=tmp_path)
    assert result.returncode == 0
    assert f"nothing to do: {path} holds no requests" in result.stdout


def test_missing_input_file_is_one_sentence(tmp_path):
    result = kvbatch("run", "nope.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "kvbatch run: input file not found: nope.jsonl"


def test_template_fields_missing_from_the_table(tmp_path):
    table = tmp_path / "people.csv"
    table.write_text("id,name\n1,Ada\n2,Grace\n")
    system = tmp_path / "system.txt"
    system.write_text("Score the candidate.")
    report = TableInput(table, system, "Name: {name}\nCV: {cv}", "id").scan()
    assert [str(p) for p in report.problems] == [
        f"{table}:1: template: field(s) cv are not columns of the table (columns: id, name)"
    ]


def test_table_input_streams_rows_with_a_shared_prefix(tmp_path):
    table = tmp_path / "people.csv"
    table.write_text("id,name\n1,Ada\n2,Grace\n2,Again\n")
    system = tmp_path / "system.txt"
    system.write_text("Score the candidate.")
    source = TableInput(table, system, "Name: {name}", "id", body_defaults={"max_tokens": 5})
    report = source.scan()
    assert [str(p) for p in report.problems] == [f"{table}:4: id: duplicate '2' (first on line 3)"]
    requests = list(source.iter_requests(report, done={"1"}))
    assert [r.custom_id for r in requests] == ["2", "2"]
    assert requests[0].body["messages"][1]["content"] == "Name: Grace"
    assert requests[0].body["max_tokens"] == 5


def test_a_request_that_cannot_fit_any_slot_is_named_and_refused(tmp_path):
    batch = small_batch(tmp_path / "in.jsonl", 3)
    huge = replace_user_message(batch, 1, "lorem ipsum " * 40000)
    result = kvbatch("plan", str(batch), cwd=tmp_path)
    assert result.returncode == 2
    assert f"the largest request, {huge['custom_id']!r}, needs about" in result.stderr
    assert "fit one slot" in result.stderr


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _line().encode() + b"\n" + _line(custom_id="b").encode() + b"\n")
    report = scan_openai_batch(path)
    assert not report.problems and report.request_count == 2
    assert [r.custom_id for r in iter_openai_batch(report)] == ["a", "b"]


def test_a_template_field_with_a_format_is_refused_in_one_sentence(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,name\n1,Ada\n")
    system = tmp_path / "system.txt"
    system.write_text("Score.")
    result = kvbatch("plan", str(table), "--system-prompt", str(system), "--template", "Name: {name:d}",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "template: field {name:d} has a format; use plain {name}" in result.stderr


def test_the_id_column_is_part_of_a_tables_fingerprint(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,name\n1,Ada\n2,Grace\n")
    system = tmp_path / "system.txt"
    system.write_text("Score.")
    by_id = TableInput(table, system, "Name: {name}", "id").scan()
    by_row = TableInput(table, system, "Name: {name}", None).scan()
    assert by_id.input_hash != by_row.input_hash


def test_a_resume_skips_done_requests_by_their_top_level_id_only(tmp_path):
    """The quick read of a done line's id must not take a "custom_id" inside the body for the line's own."""
    path = tmp_path / "in.jsonl"
    tricky = {
        "body": {"messages": [{"role": "user", "content": "x"}], "metadata": {"custom_id": "a"}},
        "custom_id": "b",
    }
    path.write_text(_line() + "\n" + json.dumps(tricky) + "\n")
    report = scan_openai_batch(path)
    assert not report.problems
    assert [r.custom_id for r in iter_openai_batch(report, done={"a"})] == ["b"]
    assert [r.custom_id for r in iter_openai_batch(report, done={"b"})] == ["a"]
