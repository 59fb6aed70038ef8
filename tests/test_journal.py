"""The journal and the run folder: append-only result lines, torn-tail repair, fingerprints, one writer, retries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kvbatch.batch.records import custom_ids
from kvbatch.batch.run.journal import Fingerprint, Journal
from kvbatch.batch.runfolder import RunFolder, RunFolderBusyError, RunLock
from kvbatch.errors import UserInputError


def fingerprint(**changes) -> Fingerprint:
    fields = {"input_hash": "sha256:abc", "model": "embedded:m.gguf:f16", "system_prompt_hash": "sha256:def",
              "generation": {"overrides": {}}, "mode": "independent"}  # fmt: skip
    return Fingerprint(**{**fields, **changes})


def test_round_trip_in_openai_batch_output_format(tmp_path):
    journal = Journal.open(tmp_path, fingerprint())
    journal.record_result('id "quoted"', {"choices": [{"message": {"content": '"custom_id": "fake"'}}]})
    journal.record_error("e1", "TruncatedPromptError", "cut", attempts=1, status_code=None,
                         details={"prompt_tokens": 10, "expected_prompt_tokens": 100})  # fmt: skip
    journal.close()
    line = json.loads((tmp_path / "results.jsonl").read_text())
    assert list(line) == ["id", "custom_id", "response", "error"]
    assert line["response"]["status_code"] == 200 and line["error"] is None
    assert custom_ids(tmp_path / "results.jsonl") == {'id "quoted"'}
    error = json.loads((tmp_path / "errors.jsonl").read_text())
    assert error["error"] == {"code": "TruncatedPromptError", "message": "cut", "prompt_tokens": 10,
                              "expected_prompt_tokens": 100}  # fmt: skip
    resumed = Journal.open(tmp_path, fingerprint())
    assert resumed.resumed and resumed.done == {'id "quoted"', "e1"} and resumed.failed == {"e1"}
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["journal_version"] == 2 and record["fingerprint"]["model"] == "embedded:m.gguf:f16"


def test_what_the_fast_encoder_refuses_is_still_written_and_journals_of_either_spacing_are_read(tmp_path):
    """orjson writes the hot path; a lone surrogate in an answer or an integer beyond 64 bits (which JSON allows and
    orjson refuses) still go to the journal, through the standard library; a journal written by the standard
    library's separators (`"custom_id": ` with a space, before orjson) is read on resume."""
    journal = Journal.open(tmp_path, fingerprint())
    journal.record_result("lone", {"choices": [{"message": {"content": "half \ud800 a pair"}}], "n": 2**70})
    journal.close()
    raw = (tmp_path / "results.jsonl").read_bytes()
    assert json.loads(raw.decode("utf-8", "surrogatepass"))["response"]["body"]["n"] == 2**70
    with open(tmp_path / "results.jsonl", "a", encoding="utf-8") as old:
        old.write(json.dumps({"id": "batch_req_1", "custom_id": "spaced", "response": {}, "error": None}) + "\n")
    assert custom_ids(tmp_path / "results.jsonl") == {"lone", "spaced"}


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    journal = Journal.open(tmp_path, fingerprint())
    journal.record_result("a", {"x": 1})
    journal.close()
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"id": "batch_req_1", "custom_id": "b", "respo')
    resumed = Journal.open(tmp_path, fingerprint())
    assert resumed.done == {"a"} and resumed.repaired_bytes > 0
    resumed.record_result("b", {"x": 2})
    resumed.close()
    ids = [json.loads(line)["custom_id"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert ids == ["a", "b"]


def test_changed_fingerprint_names_what_changed(tmp_path):
    Journal.open(tmp_path, fingerprint()).close()
    with pytest.raises(UserInputError, match="mode: was 'independent', now 'conversation'"):
        Journal.open(tmp_path, fingerprint(mode="conversation"))


def test_a_newer_journal_version_is_refused(tmp_path):
    Journal.open(tmp_path, fingerprint()).close()
    meta = json.loads((tmp_path / "run.json").read_text())
    meta["journal_version"] = 99
    (tmp_path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="newer kvbatch"):
        Journal.open(tmp_path, fingerprint())


def test_results_without_run_json_are_not_adopted(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"id": "x", "custom_id": "a", "response": {}, "error": null}\n')
    with pytest.raises(UserInputError, match="has results but no run.json"):
        Journal.open(tmp_path, fingerprint())
    assert not (tmp_path / "run.json").exists()


def test_retry_failed_keeps_the_earlier_errors_in_the_history(tmp_path):
    journal = Journal.open(tmp_path, fingerprint())
    journal.record_result("ok", {})
    journal.record_error("bad", "ServerGoneError", "gone", attempts=2)
    journal.close()
    again = Journal.open(tmp_path, fingerprint())
    assert again.retry_failed() == 1
    assert again.done == {"ok"} and (tmp_path / "errors.jsonl").read_text() == ""
    history = [json.loads(line) for line in (tmp_path / "errors-history.jsonl").read_text().splitlines()]
    assert [h["custom_id"] for h in history] == ["bad"] and history[0]["retried_unix_s"] > 0


def test_one_writer_per_run_folder_names_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from kvbatch.batch.runfolder import "
         "RunFolder, RunLock; RunLock(RunFolder(Path(sys.argv[1]))).acquire(); print('held', flush=True); "
         "sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusyError, match=f"being written by kvbatch process {holder.pid}"):
            RunLock(RunFolder(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(RunFolder(tmp_path)):  # the OS released the dead holder's lock
        pass
