"""`kvbatch api`: the OpenAI Batch API served on this machine."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kvbatch.aio import run_sync
from kvbatch.api.service import api_key_from, serve
from kvbatch.api.store import read_outbox
from kvbatch.cli.settings import settings_from_args
from kvbatch.errors import UserInputError


def cmd_api(args: argparse.Namespace) -> int:
    key = api_key_from(args.api_key_env, args.host)
    secret = os.environ.get(args.webhook_secret_env) if args.webhook_secret_env else None
    if args.webhook_secret_env and not secret:
        raise UserInputError(f"--webhook-secret-env {args.webhook_secret_env}: that environment variable is not set")
    args.input, args.run = "api-batch.jsonl", "api"  # each batch's own file and run folder replace them
    settings = settings_from_args(args)
    run_sync(serve(settings, data=Path(args.data), host=args.host, port=args.port, api_key=key,
                   webhook_url=args.webhook_url, webhook_secret=secret, report=not args.no_report,
                   batch_webhook_prefixes=tuple(args.batch_webhook_prefix),
                   webhook_give_up_s=args.webhook_give_up_hours * 3600))  # fmt: skip
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    """The webhook outbox of a store (also while its `kvbatch api` runs): counts, then the newest deliveries."""
    counts, deliveries = read_outbox(Path(args.data), limit=args.limit)
    print(f"webhooks in {args.data}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for d in deliveries:
        when = "" if d.state != "pending" else f", next in {max(d.next_at - time.time(), 0):.0f} s"
        error = f" ({d.last_error})" if d.last_error and d.state != "delivered" else ""
        print(f"  {d.state:<9} {d.event_type:<16} {d.batch_id}  {d.event_id}  -> {d.url}  "
              f"{d.attempts} attempt(s){when}{error}")  # fmt: skip
    return 0
