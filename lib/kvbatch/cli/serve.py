"""`kvbatch serve`: the embedded llama-server in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from kvbatch.cli.settings import server_config_from_args
from kvbatch.serve.build_record import build_summary
from kvbatch.serve.server import EmbeddedServer


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the embedded llama-server in the foreground until Ctrl-C."""
    server = EmbeddedServer(server_config_from_args(args))
    with server:
        log = server.log()
        print(f"llama-server ready at {server.url} (pid {server.pid}, started in {server.start_time_s:.1f} s)")
        print(f"  build: {build_summary()['build']}")
        print(f"  OpenAI-compatible: {server.url}/v1/chat/completions   health: {server.url}/health")
        print(f"  API key (send as 'Authorization: Bearer KEY'): {server.api_key}")
        print(f"  KV cache: {log.kv_total_bytes / 2**20:.1f} MiB; slot context: {log.slot_context_tokens or '?'}")
        print(f"  log: {server.log_path}   Ctrl-C stops it", flush=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"] and server.is_running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        if not server.is_running():
            print(f"llama-server exited on its own; see {server.log_path}", file=sys.stderr)
            return 1
    print("llama-server stopped")
    return 0
