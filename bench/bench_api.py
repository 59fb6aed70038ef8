"""`kvbatch api` benchmarks, printed side by side in one run:

  1. a batch's throughput while a client polls it 10 times a second, against the same batch polled once every
     2 s, rounds back to back on a server with a fixed service time per request; each batch's time from its run
     folder's own metrics (first answer to last)                                            (goal >= 0.95)
  2. the API's peak memory (VmHWM) while a 170,000-line batch file of the shipped sample's shape uploads, against
     its memory before: the upload streams to disk                                 (goal: flat, < 100 MiB more)
  3. kill -9 of `kvbatch api` mid-batch, then a restart on the same --data: each custom_id once in the output,
     and the requests sent again after the restart (goal: no more than were in flight)

Usage: .venv/bin/python bench/bench_api.py [--parts 1,2,3] [--n 2000] [--big-n 170000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai
from kvbatch.batch.inputs.sample import write_sample

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_executor import row, rows, start_instant_server  # noqa: E402


def start_api(work: Path, server_url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbatch.cli", "api", "--port", "0", "--data", str(work / "api"), "--url", server_url,
         "--no-report", "--no-progress", *extra],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(r"OpenAI Batch API at (http://\S+/v1)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # keep draining
            return process, found.group(1)
    raise RuntimeError("kvbatch api did not start")


def wait(client: openai.OpenAI, batch_id: str, until, every_s: float):
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(every_s)


def timed_batch(client: openai.OpenAI, work: Path, file_id: str, poll_s: float) -> float:
    """Seconds from the batch's first answer to its last, from its run folder's own metrics (not from the polls,
    whose spacing would add up to `poll_s` to the quiet batch)."""
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    wait(client, batch.id, lambda b: b.status in ("completed", "failed"), poll_s)
    metrics = work / "api" / "batches" / batch.id / "metrics.jsonl"
    done = [json.loads(line)["t_done_unix_s"] for line in metrics.open()]
    return max(done) - min(done)


def part_1(work: Path, n: int, rounds: int = 3) -> None:
    batch = write_sample(work / "poll.jsonl", n, max_tokens=8, system_tokens=300, user_tokens=40)
    server, server_url = start_instant_server("--service-s", "0.01", "--slots", "8")
    api, url = start_api(work, server_url, "--concurrency", "8")
    try:
        client = openai.OpenAI(base_url=url, api_key="local", max_retries=0)
        file_id = client.files.create(file=batch.open("rb"), purpose="batch").id
        ratios = []
        for _ in range(rounds):
            quiet = timed_batch(client, work, file_id, 2.0)
            busy = timed_batch(client, work, file_id, 0.1)
            ratios.append(quiet / busy)
            print(f"    round: {n / quiet:.1f} req/s polled every 2 s, {n / busy:.1f} req/s polled 10/s", flush=True)
        ratio = statistics.median(ratios)
        row("throughput polled 10/s vs every 2 s (median round)", f"{ratio:.2f} of the quiet rate",
            ", ".join(f"{r:.2f}" for r in ratios), f"{ratio:.2f} (goal >= 0.95)")  # fmt: skip
    finally:
        os.killpg(api.pid, signal.SIGKILL)
        server.kill()


def _hwm(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


def part_2(work: Path, big_n: int) -> None:
    big = write_sample(work / "big.jsonl", big_n)  # the shipped sample's shape: 2,400-token prompt, 600-token messages
    size = big.stat().st_size
    server, server_url = start_instant_server()
    api, url = start_api(work, server_url)
    try:
        client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=3600)
        client.batches.list()
        before = _hwm(api.pid)
        started = time.perf_counter()
        uploaded = client.files.create(file=big.open("rb"), purpose="batch")
        took = time.perf_counter() - started
        after = _hwm(api.pid)
        assert uploaded.bytes == size
        row(f"upload of {big_n:,} lines ({size / 2**30:.2f} GiB) in {took:.0f} s: the API's peak memory",
            f"{after / 2**20:.0f} MiB after", f"{before / 2**20:.0f} MiB before",
            f"+{(after - before) / 2**20:.0f} MiB (goal < 100 MiB)")  # fmt: skip
    finally:
        os.killpg(api.pid, signal.SIGKILL)
        server.kill()
        big.unlink(missing_ok=True)


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats") as reply:  # noqa: S310 (loopback)
        return json.loads(reply.read())


def part_3(work: Path, n: int) -> None:
    batch = write_sample(work / "kill.jsonl", n, max_tokens=8, system_tokens=300, user_tokens=40)
    server, server_url = start_instant_server("--service-s", "0.005", "--slots", "4")
    try:
        api, url = start_api(work, server_url, "--concurrency", "4")
        client = openai.OpenAI(base_url=url, api_key="local", max_retries=0)
        file_id = client.files.create(file=batch.open("rb"), purpose="batch").id
        made = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        at_kill = wait(client, made.id, lambda b: b.request_counts.completed >= n // 3, 0.05).request_counts.completed
        os.killpg(api.pid, signal.SIGKILL)
        api.wait()
        sent_before = _stats(server_url).get("requests", 0)
        started = time.perf_counter()
        api, url = start_api(work, server_url, "--concurrency", "4")
        client = openai.OpenAI(base_url=url, api_key="local", max_retries=0)
        done = wait(client, made.id, lambda b: b.status == "completed", 0.1)
        took = time.perf_counter() - started
        sent_after = _stats(server_url).get("requests", 0) - sent_before
        ids = [json.loads(line)["custom_id"] for line in client.files.content(done.output_file_id).text.splitlines()]
        os.killpg(api.pid, signal.SIGKILL)
        row(f"kill -9 at {at_kill:,} of {n:,} done, restart", f"{len(set(ids)):,} ids, {len(ids):,} lines",
            f"{sent_after:,} sent after the restart ({n - at_kill:,} were left)",
            f"exactly once: {len(ids) == len(set(ids)) == n}; the rest in {took:.1f} s")  # fmt: skip
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--big-n", type=int, default=170_000)
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if 1 in parts:
            print("1. polling while a batch runs", flush=True)
            part_1(work, args.n)
        if 2 in parts:
            print("2. a 170,000-line upload", flush=True)
            part_2(work, args.big_n)
        if 3 in parts:
            print("3. kill -9 and restart", flush=True)
            part_3(work, args.n)
    print("\n| what | kvbatch api | against | ratio |\n|---|---|---|---|")
    for what, measured, baseline, ratio in rows:
        print(f"| {what} | {measured} | {baseline} | {ratio} |")


if __name__ == "__main__":
    main()
