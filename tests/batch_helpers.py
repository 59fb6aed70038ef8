"""Small batch inputs and a way to drive the `kvbatch` command as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvbatch.batch.inputs.sample import write_sample
from kvbatch.batch.records import custom_ids


def small_batch(path: Path, n: int, *, max_tokens: int = 6) -> Path:
    """n requests under a ~300-token system prompt with ~40-token messages: each takes well under a second here."""
    return write_sample(path, n, max_tokens=max_tokens, system_tokens=300, user_tokens=40)


def kvbatch(*args: str, cwd: Path, timeout: float | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """`kvbatch ARGS` to its end; `env`: variables added to this process's environment."""
    timeout = timeout or WAIT_CEILING_S
    return subprocess.run([sys.executable, "-m", "kvbatch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env} if env else None)  # fmt: skip


WAIT_CEILING_S = 1200.0
"""How long a test waits for an event before it fails: far beyond what any machine needs (the waits end on the
event, not on the clock), so only a hang reaches it."""
_started: list[subprocess.Popen] = []


def start_kvbatch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`kvbatch` in the background, in a process group of its own, so a test that fails cannot leave it (and its
    servers, Ray workers) competing for the CPU with the tests after it (`stop_started`). `env`: variables added
    to this process's environment."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbatch.cli", *args],
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _started.append(process)
    return process


def stop_started() -> None:
    """Kill whatever `start_kvbatch` started that is still running, with its whole process group."""
    while _started:
        process = _started.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout:
            process.stdout.close()


def wait_until(condition: Callable[[], object], what: str, process: subprocess.Popen | None = None,
               ceiling_s: float = WAIT_CEILING_S) -> object:  # fmt: skip
    """Wait for an event (the condition's value, once true), however slow the machine; fail if the process ended
    first or nothing happened within the ceiling."""
    deadline = time.monotonic() + ceiling_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"kvbatch exited ({process.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"not {what} within {ceiling_s:.0f} s")


def result_lines(run_dir: Path, name: str = "results.jsonl") -> list[dict]:
    path = run_dir / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def input_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines() if line.strip()]


def count_lines(path: Path) -> int:
    return len(custom_ids(path)) if path.exists() else 0


def replace_user_message(batch: Path, line_index: int, content: str) -> dict:
    """Rewrite one request's user message in place; returns that request."""
    lines = batch.read_text().splitlines()
    request = json.loads(lines[line_index])
    request["body"]["messages"][-1]["content"] = content
    lines[line_index] = json.dumps(request)
    batch.write_text("\n".join(lines) + "\n")
    return request


def wait_for_results(run_dir: Path, at_least: int, process: subprocess.Popen | None = None,
                     timeout_s: float = WAIT_CEILING_S) -> int:  # fmt: skip
    """Wait until the run has `at_least` result lines (or its process ended); returns how many it has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count = len(result_lines(run_dir))
        if count >= at_least or (process is not None and process.poll() is not None):
            return count
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} results after {timeout_s} s")


def has_event(run_dir: Path, predicate: Callable[[dict], bool]) -> bool:
    return any(predicate(event) for event in result_lines(run_dir, "events.jsonl"))
