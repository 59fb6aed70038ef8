"""The journal: append-only result lines, torn-tail repair, fingerprints."""

from __future__ import annotations

import json

import pytest
from kvbatch.errors import UserInputError
from kvbatch.journal import Fingerprint, Journal, completed_ids

FP = Fingerprint("sha256:abc", "m.gguf", "sha256:def", {"overrides": {}}, "independent")


def test_round_trip_in_openai_batch_output_format(tmp_path):
    journal = Journal.open(tmp_path, FP)
    journal.record_result('id "quoted"', {"choices": [{"message": {"content": '"custom_id": "fake"'}}]})
    journal.record_error("e1", "ContextOverflowError", "too long", attempts=1, status_code=400)
    journal.close()
    line = json.loads((tmp_path / "results.jsonl").read_text())
    assert list(line) == ["id", "custom_id", "response", "error"]
    assert line["response"]["status_code"] == 200 and line["error"] is None
    assert completed_ids(tmp_path / "results.jsonl") == {'id "quoted"'}
    error = json.loads((tmp_path / "errors.jsonl").read_text())
    assert error["error"] == {"code": "ContextOverflowError", "message": "too long"} and error["attempts"] == 1
    resumed = Journal.open(tmp_path, FP)
    assert resumed.resumed and resumed.done == {'id "quoted"', "e1"}


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    journal = Journal.open(tmp_path, FP)
    journal.record_result("a", {"x": 1})
    journal.close()
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"id": "batch_req_1", "custom_id": "b", "respo')
    resumed = Journal.open(tmp_path, FP)
    assert resumed.done == {"a"} and resumed.repaired_bytes > 0
    resumed.record_result("b", {"x": 2})
    resumed.close()
    assert [json.loads(line)["custom_id"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [
        "a",
        "b",
    ]


def test_changed_fingerprint_names_what_changed(tmp_path):
    Journal.open(tmp_path, FP).close()
    changed = Fingerprint("sha256:abc", "m.gguf", "sha256:def", {"overrides": {}}, "conversation")
    with pytest.raises(UserInputError, match="mode: was 'independent', now 'conversation'"):
        Journal.open(tmp_path, changed)


def test_a_newer_journal_version_is_refused(tmp_path):
    Journal.open(tmp_path, FP).close()
    meta = json.loads((tmp_path / "run.json").read_text())
    meta["journal_version"] = 99
    (tmp_path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="newer kvbatch"):
        Journal.open(tmp_path, FP)
