"""Run the test suite the way a slow machine would: every embedded server held to one thread while CPU-bound
processes compete for the cores, and say how much slower the server was than normal.

The suite must not depend on the machine's speed (issue: an AVX2-only 2-core VM runs the server about 4.5x slower
than an AVX-512 one); this is how that is checked on a fast machine. It first measures the server's prompt speed
normally and under the slow conditions (the same prompt, the server's own `timings`), prints the ratio, then runs
`make test` (or the pytest arguments given) under those conditions and prints the suite's time.

Usage: .venv/bin/python tools/slow_suite.py [--burners 2] [--threads 1] [--measure-only] [-- PYTEST_ARGS...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kvbatch import defaults
from kvbatch.batch.inputs.sample import system_prompt
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.server import EmbeddedServer

REPO = Path(__file__).resolve().parents[1]
BURNER = "while True: pass"


@contextlib.contextmanager
def burners(count: int) -> Iterator[None]:
    """CPU-bound processes that compete with the suite and its servers for the cores, for as long as it runs."""
    procs = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def prompt_speed(threads: int | None, repeats: int = 3) -> float:
    """The server's own prompt tokens/s on a ~1,500-token prompt (best of a few: the slow case is already slow)."""
    speeds = []
    with EmbeddedServer(ServerConfig(context_tokens=4096, threads=threads, cache_ram_mib=0)) as server:

        async def ask(seed: int) -> float:
            body = {"messages": [{"role": "user", "content": f"{seed} " + system_prompt(1000)}], "max_tokens": 1,
                    "cache_prompt": False}  # fmt: skip
            async with get_backend("openai", server.url, options=BackendOptions(api_key=server.api_key)) as backend:
                reply = await backend.chat(body)
            return float(reply.timings.get("prompt_per_second") or 0.0)

        for seed in range(repeats):
            speeds.append(asyncio.run(ask(seed)))
    return max(speeds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2, help="CPU-bound competing processes")
    parser.add_argument("--threads", type=int, default=1, help="threads of every embedded server the tests start")
    parser.add_argument("--measure-only", action="store_true", help="print the slowdown, run no tests")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (default: the whole suite)")
    args = parser.parse_args()
    normal = prompt_speed(None)
    with burners(args.burners):
        slow = prompt_speed(args.threads)
    print(f"server prompt speed: normal {normal:,.0f} tokens/s; held to {args.threads} thread(s) beside "
          f"{args.burners} CPU burner(s): {slow:,.0f} tokens/s ({normal / slow:.1f}x slower)", flush=True)  # fmt: skip
    if args.measure_only:
        return 0
    env = dict(os.environ, **{defaults.SERVER_THREADS_ENV: str(args.threads)})
    command = ["make", "test"] + ([f"PYTEST_ARGS={' '.join(args.pytest_args)}"] if args.pytest_args else [])
    started = time.perf_counter()
    with burners(args.burners):
        code = subprocess.run(command, cwd=REPO, env=env).returncode
    print(f"slow suite: exit {code} in {time.perf_counter() - started:,.0f} s ({args.threads} server thread(s), "
          f"{args.burners} burner(s), {normal / slow:.1f}x slower server)")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
