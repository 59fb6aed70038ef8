"""Small batch inputs and a way to drive the `kvbatch` command as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from kvbatch.batch.journal import completed_ids
from kvbatch.batch.sample import write_sample


def small_batch(path: Path, n: int, *, max_tokens: int = 6) -> Path:
    """n requests under a ~300-token system prompt with ~40-token messages: each takes well under a second here."""
    return write_sample(path, n, max_tokens=max_tokens, system_tokens=300, user_tokens=40)


def kvbatch(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvbatch.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def start_kvbatch(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kvbatch.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def result_lines(run_dir: Path, name: str = "results.jsonl") -> list[dict]:
    path = run_dir / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def input_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines() if line.strip()]


def count_lines(path: Path) -> int:
    return len(completed_ids(path)) if path.exists() else 0


def replace_user_message(batch: Path, line_index: int, content: str) -> dict:
    """Rewrite one request's user message in place; returns that request."""
    lines = batch.read_text().splitlines()
    request = json.loads(lines[line_index])
    request["body"]["messages"][-1]["content"] = content
    lines[line_index] = json.dumps(request)
    batch.write_text("\n".join(lines) + "\n")
    return request


def wait_for_results(run_dir: Path, at_least: int, process: subprocess.Popen | None = None,
                     timeout_s: float = 240) -> int:  # fmt: skip
    """Wait until the run has `at_least` result lines (or its process ended); returns how many it has."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        count = len(result_lines(run_dir))
        if count >= at_least or (process is not None and process.poll() is not None):
            return count
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} results after {timeout_s} s")
