"""The `kvbatch` command, by command group: the parser (`parser`, every flag), what flags mean as settings
(`settings`), and the handlers (`serve`, `batch`, `measure`, `api`), each imported only when its command runs. The
library raises; only these modules print, one sentence per mistake."""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Sequence

from kvbatch.cli.parser import build_parser
from kvbatch.errors import EXIT_INTERRUPTED, KvbatchError, exit_code


def _handler(name: str):
    """ "batch:cmd_run" -> kvbatch.cli.batch.cmd_run (imported now: only the command that runs pays for it)."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(f"kvbatch.cli.{module}"), function)


def main(argv: Sequence[str] | None = None) -> int:
    # A shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt; the
    # terminal only sends Ctrl-C to the foreground job anyway, so always take it as "stop cleanly".
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_handler(args.handler)(args) or 0)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C).", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KvbatchError as exc:
        print(f"kvbatch {args.command}: {exc}", file=sys.stderr)
        return exit_code(exc)
