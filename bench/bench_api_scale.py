"""`kvbatch api` at the user's scale, through the official `openai` SDK, with the two accidents a service meets:

  one batch of 170,000 requests of the shipped sample's shape (2,400-token criteria, 600-token messages) uploaded,
  run against an instant OpenAI-compatible server (bench/fault_server.py, in its own process); `kill -9` of the API
  at 35 % done and a restart on the same --data; the upstream server gone for 20 s at 65 % (killed, then started
  again on its port); a client polling the batch every 0.5 s throughout; a webhook receiver that is down from the
  kill until the batch completes (the event waits in the outbox, then arrives).

Prints: the time, exactly-once (each custom_id once in the output file), the API's peak resident memory (VmHWM,
each incarnation), the poll latency p50/p99, and the webhook ids received.

Usage: .venv/bin/python bench/bench_api_scale.py [--n 170000] [--kill-at 0.35] [--outage-at 0.65] [--outage-s 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
from aiohttp import web
from kvbatch.batch.inputs.sample import write_sample

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_api import _hwm, start_api  # noqa: E402
from bench_executor import free_port, start_instant_server_on  # noqa: E402


class Receiver:
    """A webhook receiver in a thread: answers 503 while `down`, else keeps each event's `webhook-id`."""

    def __init__(self) -> None:
        self.down = False
        self.ids: list[str] = []
        self.port = free_port()
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self._runner = web.AppRunner(app)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        loop.run_forever()

    async def hook(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503)
        self.ids.append(request.headers["webhook-id"])
        return web.Response()


class Poller:
    """Polls the batch every `every_s` in a thread, timing each answer; keeps the latest batch."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.latencies, self.latest, self.client = every_s, [], None, None
        self.batch_id: str | None = None
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            time.sleep(self.every_s)
            client, batch_id = self.client, self.batch_id
            if client is None or batch_id is None:
                continue
            started = time.perf_counter()
            try:
                self.latest = client.batches.retrieve(batch_id)
            except openai.APIConnectionError:  # the API killed, not yet back
                continue
            self.latencies.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=170_000)
    parser.add_argument("--kill-at", type=float, default=0.35)
    parser.add_argument("--outage-at", type=float, default=0.65)
    parser.add_argument("--outage-s", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        started = time.perf_counter()
        batch_file = write_sample(work / "big.jsonl", args.n)
        print(f"wrote {args.n:,} requests ({batch_file.stat().st_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
        server_port = free_port()
        server, server_url = start_instant_server_on(server_port, "--slots", str(args.concurrency))
        receiver, poller = Receiver(), Poller()
        flags = ("--concurrency", str(args.concurrency), "--webhook-url", f"http://127.0.0.1:{receiver.port}/hook")
        api, url = start_api(work, server_url, *flags)
        peaks = []
        try:
            client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=3600)
            started = time.perf_counter()
            file_id = client.files.create(file=batch_file.open("rb"), purpose="batch").id
            upload_s = time.perf_counter() - started
            batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h")  # fmt: skip
            poller.client, poller.batch_id = client, batch.id
            started = time.perf_counter()

            def done() -> int:
                latest = poller.latest
                return latest.request_counts.completed + latest.request_counts.failed if latest else 0

            while done() < args.kill_at * args.n:
                time.sleep(0.2)
            receiver.down = True
            peaks.append(_hwm(api.pid))
            at_kill = done()
            os.killpg(api.pid, signal.SIGKILL)
            api.wait()
            poller.client = None
            api, url = start_api(work, server_url, *flags)
            poller.client = openai.OpenAI(base_url=url, api_key="local", max_retries=0)
            print(f"killed the API at {at_kill:,} done, restarted", flush=True)
            while done() < args.outage_at * args.n:
                time.sleep(0.2)
            server.kill()
            server.wait()
            at_outage = done()
            time.sleep(args.outage_s)
            server, _ = start_instant_server_on(server_port, "--slots", str(args.concurrency))
            print(f"upstream gone for {args.outage_s:.0f} s at {at_outage:,} done", flush=True)
            while not (poller.latest and poller.latest.status in ("completed", "failed", "cancelled")):
                time.sleep(0.5)
            took = time.perf_counter() - started
            final = poller.latest
            receiver.down = False
            deadline = time.monotonic() + 120
            while not receiver.ids and time.monotonic() < deadline:
                time.sleep(0.5)
            peaks.append(_hwm(api.pid))
            client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=3600)
            output = client.files.content(final.output_file_id).text
            ids = [json.loads(line)["custom_id"] for line in output.splitlines()]
        finally:
            os.killpg(api.pid, signal.SIGKILL)
            server.kill()
    latencies = sorted(poller.latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print("\n| what | figure |\n|---|---|")
    print(f"| requests | {args.n:,}, uploaded in {upload_s:.0f} s |")
    counts = final.request_counts
    print(f"| status | {final.status}: {counts.completed:,} completed, {counts.failed:,} failed |")
    print(f"| time, upload done to completed (kill -9 at {at_kill:,}, upstream gone {args.outage_s:.0f} s at "
          f"{at_outage:,}) | {took:.0f} s ({args.n / took:.0f} req/s) |")  # fmt: skip
    print(f"| exactly once | {len(ids) == len(set(ids)) == args.n} ({len(set(ids)):,} ids, {len(ids):,} lines) |")
    print(f"| API peak resident memory (first, second process) | {' / '.join(f'{p / 2**20:.0f} MiB' for p in peaks)} |")
    print(f"| poll latency over {len(latencies):,} polls | p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms |")  # fmt: skip
    print(f"| webhook (receiver down from the kill to the end) | {len(receiver.ids)} delivery(ies), "
          f"{len(set(receiver.ids))} event id(s) |")  # fmt: skip


if __name__ == "__main__":
    main()
